"""What masked LoRA costs against LoRA, same modules and rank, on a pruned embedded model: training memory, the time
of one training step, and the unmerged forward time against the pruned model's.

    python benchmarks/masked_lora_cost.py                          # both embedded models; results/masked-lora-cost.json
    python benchmarks/masked_lora_cost.py --models smollm2-135m --output -   # one, printed

Each model is pruned by magnitude to 50% (the cost depends on the layers' shapes, not on which weights are zero), then
LoRA and masked LoRA (r=8, every linear layer: `restorelcc compare`'s builders) are built on copies of it and measured
on `restorelcc compare`'s training batch (8 sequences of 128 tokens, every token a label):

- training memory: ``recovery.training_memory_bytes`` (tensors saved for backward, gradients and AdamW's moments;
  counted, so CPU and GPU agree), what `restorelcc compare` records per run as ``train_memory_mb``;
- one training step (forward and backward), the fastest of ``--repeats`` after a warm-up;
- unmerged speed: ``merged_checks.unmerged_speed``, as `restorelcc compare` measures it.

Masked LoRA materialises its masked update, a dense ``out x in`` matrix, in every adapted layer, and autograd keeps it
for the backward pass: about one fp32 copy of every adapted weight more than LoRA holds in training, and about one
more dense matmul per layer in every unmerged forward. Merged, both cost what the pruned model does.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import torch

from peft_restorelcc import pipeline
from peft_restorelcc.compare import runs as compare
from peft_restorelcc.compare.merged_checks import fixed_batch, unmerged_speed
from peft_restorelcc.evaluation import statistics as recovery

RESULTS = Path(__file__).parent / "results"
BATCH = (8, 128)  # restorelcc compare's --batch-size and --seq-len
METHODS = ("lora", "masked-lora")


def step_seconds(model: torch.nn.Module, batch: dict[str, torch.Tensor], repeats: int) -> float:
    """The fastest of ``repeats`` forward-and-backward passes on ``batch`` (after one warm-up); gradients cleared."""
    model.train()
    times = []
    for index in range(repeats + 1):
        start = time.perf_counter()
        model(**batch).loss.backward()
        if index:
            times.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
    return min(times)


def measure(name: str, repeats: int) -> dict:
    dense, tokenizer = pipeline.load(name, dtype="float32")
    pruned, _ = pipeline.prune(dense, tokenizer, "magnitude", 0.5)
    del dense
    ids = fixed_batch(pruned, BATCH)
    batch = {"input_ids": ids, "labels": ids}
    settings = compare.CompareSettings(model=name)
    rows = {}
    for method in METHODS:
        spec = compare.standard_spec(method, settings)
        torch.manual_seed(0)
        model = compare.BUILDERS[spec.kind](copy.deepcopy(pruned), spec, None)
        rows[method] = {
            "trainable_parameters": recovery.trainable_parameters(model),
            "train_memory_mb": round(recovery.training_memory_bytes(model, batch) / 2**20, 1),
            "train_step_seconds": round(step_seconds(model, batch, repeats), 3),
            **unmerged_speed(pruned, model),
        }
        del model
    lora, masked = rows["lora"], rows["masked-lora"]
    adapted = sum(module.weight.numel() for module in _adapted_linears(pruned))
    return {
        "model": name, "batch": list(BATCH), "adapted_weights": adapted,
        "adapted_weights_fp32_mb": round(adapted * 4 / 2**20, 1), "methods": rows,
        "masked_minus_lora_train_memory_mb": round(masked["train_memory_mb"] - lora["train_memory_mb"], 1),
        "masked_over_lora_train_step": round(masked["train_step_seconds"] / lora["train_step_seconds"], 2),
    }  # fmt: skip


def _adapted_linears(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The linear layers LoRA's ``all-linear`` adapts: every nn.Linear but the output head."""
    head = model.get_output_embeddings()
    return [module for module in model.modules() if isinstance(module, torch.nn.Linear) and module is not head]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="smollm2-135m,gemma3-270m")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", default=str(RESULTS / "masked-lora-cost.json"), help="a JSON file, or - to print")
    args = parser.parse_args(argv)
    report = {
        "command": "python benchmarks/masked_lora_cost.py" + (" " + " ".join(argv) if argv else ""),
        "device": "cpu", "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__, "rows": [measure(name, args.repeats) for name in args.models.split(",")],
    }  # fmt: skip
    text = json.dumps(report, indent=2) + "\n"
    if args.output == "-":
        sys.stdout.write(text)
    else:
        Path(args.output).write_text(text)
        print(f"results: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
