"""What pruning costs SmolLM2-135M: accuracy on the paper's seven tasks, held-out perplexity, pruning time.

    python benchmarks/pruning.py [--limit 40] [--samples 64] [--output benchmarks/results/pruning.json]

Rows: dense, magnitude 50%, Wanda 50%, SparseGPT 50%, Wanda 2:4 (configurable with --configs). Wanda and SparseGPT
use --samples windows of 128 tokens of the LAMBADA training passages. Accuracy is on the first --limit items of
each task (acc_norm where the task has it), perplexity on the first --perplexity-passages held-out passages.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch
from report import pruning_table
from tqdm import tqdm

from peft_restorelcc import pipeline
from peft_restorelcc.evaluation import statistics as recovery
from peft_restorelcc.io import load_model, load_tokenizer

CONFIGS = {
    "magnitude-50%": ("magnitude", 0.5, None),
    "wanda-50%": ("wanda", 0.5, None),
    "sparsegpt-50%": ("sparsegpt", 0.5, None),
    "wanda-2:4": ("wanda", None, "2:4"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--limit", type=int, default=40)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--perplexity-passages", type=int, default=48)
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "pruning.json")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (1 is faster on a busy machine)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    command = shlex.join(["python", "benchmarks/pruning.py", *sys.argv[1:]])
    tokenizer = load_tokenizer(args.model)
    dense = load_model(args.model)
    evaluate = dict(limit=args.limit, perplexity_passages=args.perplexity_passages)
    rows = []

    def add_row(name: str, model: torch.nn.Module, report: dict | None) -> None:
        results = pipeline.evaluate(model, tokenizer, **evaluate)
        rows.append(
            {
                "model": name,
                "tasks": {
                    task: metrics[recovery.headline_metric(metrics)]
                    for task, metrics in results["tasks"].items()
                },
                "avg_acc": recovery.headline_accuracy(results),
                "ppl": results["perplexity"],
                "sparsity": None if report is None else report["overall_sparsity"],
                "prune_seconds": None if report is None else report["seconds"],
            }
        )
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(
            json.dumps({"settings": vars(args) | {"output": str(args.output)}, "commands": [command], "rows": rows}, indent=2)
        )

    add_row("dense", dense, None)
    for name in tqdm(args.configs.split(","), desc="pruning configs"):
        method, sparsity, pattern = CONFIGS[name]
        pruned, report = pipeline.prune(dense, tokenizer, method, sparsity, pattern, samples=args.samples)
        add_row(name, pruned, report)
        del pruned

    table = pruning_table({"rows": rows})
    args.output.with_suffix(".md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
