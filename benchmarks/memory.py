"""Peak resident memory of every stage of `restorelcc run`, against the model's own size, whatever the vocabulary.

    python benchmarks/memory.py                          # every configuration below; writes results/memory.{json,png}
    python benchmarks/memory.py --configs gemma3-270m    # some of them

Each configuration runs the real main job (`restorelcc run`, default settings apart from a smaller workload: the
stages and their batch sizes are the defaults, only the counts of items, steps and samples are cut) in its own
process, which records the kernel's peak resident memory per stage (recovery.StageTimer). Configurations: the two
embedded models, and random-weight models with the vocabularies of Llama 3 (128,256), Qwen2.5 (152,064) and Gemma 3
(262,144), Gemma 3's at two widths (the random ones use SmolLM2's tokenizer; its ids are valid in every larger vocabulary).
``--old-eval-batch`` adds one run per configuration at the former fixed lm-eval batch of 16, for comparison.

    python benchmarks/memory.py --text-step --configs gemma3-270m,gemma3-vocab-h512   # results/memory-text-step.json

``--text-step`` measures one training step (forward and backward) on plain text, where every token is a label (`--data
text`: the head cannot be narrowed to the answers), with the head chunked (the default) and in one call, each in its own
process: TEXT_STEP sequences of TEXT_STEP_LEN tokens, a RestoreLCC adapter on every head.

Target: peak <= 2.5 x the fp32 model size + a fixed margin (the process's libraries, measured here as the peak of
a process that only imports them, plus the 1 GiB floor of the logits budget).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
# BoolQ and HellaSwag hold the longest requests of the seven tasks: they set the evaluation's batch and its peak.
WORKLOAD = ["--tasks", "boolq,hellaswag", "--limit", "10", "--train-steps", "4", "--train-samples", "64", "--calibration-samples", "16",
            "--num-pairs", "32", "--prune-samples", "8", "--perplexity-passages", "8"]  # fmt: skip
TARGET_FACTOR = 2.5
LOGITS_FLOOR_GIB = 1.0
# name: (architecture, vocabulary, hidden size, layers); heads of 64 dims.
RANDOM_CONFIGS = {
    "llama3-vocab-h512": ("llama", 128_256, 512, 8),
    "qwen2.5-vocab-h512": ("llama", 152_064, 512, 8),
    "gemma3-vocab-h512": ("gemma3_text", 262_144, 512, 8),
    "gemma3-vocab-h1024": ("gemma3_text", 262_144, 1024, 8),
}
EMBEDDED = ("smollm2-135m", "gemma3-270m")
# The plain-text step: `restorelcc run`'s training batch (8) and sequence length (128).
TEXT_STEP, TEXT_STEP_LEN = 8, 128


def random_model(name: str, directory: Path) -> Path:
    """A random-weight model of ``RANDOM_CONFIGS[name]`` saved with SmolLM2's tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from peft_restorelcc.io import load_tokenizer

    model_type, vocab, hidden, layers = RANDOM_CONFIGS[name]
    config = AutoConfig.for_model(
        model_type, vocab_size=vocab, hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
        num_attention_heads=hidden // 64, num_key_value_heads=hidden // 128, head_dim=64, tie_word_embeddings=True,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory / name)
    load_tokenizer("smollm2-135m").save_pretrained(directory / name)
    return directory / name


def fp32_model_gib(model: str) -> float:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from peft_restorelcc.io import resolve_model_path

    config = AutoConfig.from_pretrained(resolve_model_path(model))

    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
    return sum(parameter.numel() for parameter in meta.parameters()) * 4 / 2**30


def libraries_gib() -> float:
    """Peak resident memory of a process that imports what the main job imports and does nothing else."""
    code = ("import lm_eval.models.huggingface, peft_restorelcc.cli\n"
            "from peft_restorelcc.evaluation.statistics import peak_rss_bytes\nprint(peak_rss_bytes())")  # fmt: skip
    return int(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout) / 2**30


def run_main_job(model: str, output: Path, extra: list[str]) -> dict:
    command = [sys.executable, "-m", "peft_restorelcc", "run", "--model", model, "--output", str(output),
               *WORKLOAD, *extra]  # fmt: skip
    start = time.perf_counter()
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode != 0:
        return {"failed": completed.stderr.strip().splitlines()[-1:] or ["killed"], "returncode": completed.returncode}
    summary = json.loads((output / "results.json").read_text())
    return {"stage_peak_rss_gib": summary["stage_peak_rss_gib"], "wall_s": round(time.perf_counter() - start, 1)}


def measure(name: str, model: str, model_gib: float, margin_gib: float, output: Path, extra: list[str]) -> dict:
    result = run_main_job(model, output, extra)
    row = {"config": name, "model_fp32_gib": round(model_gib, 3), "flags": extra, **result}
    if "stage_peak_rss_gib" in result:
        peak = max(result["stage_peak_rss_gib"].values())
        row["peak_gib"] = peak
        row["peak_over_model"] = round((peak - margin_gib) / model_gib, 2)
        row["within_target"] = peak <= TARGET_FACTOR * model_gib + margin_gib
    print(json.dumps(row), flush=True)
    return row


def text_step(model: str, chunked: bool) -> dict:
    """Peak resident memory of one plain-text training step of ``model`` (run in a child process)."""
    import tempfile

    import torch
    from peft import get_peft_model
    from transformers import TrainingArguments

    from peft_restorelcc import RestoreLCCConfig, pipeline
    from peft_restorelcc.evaluation import statistics as recovery
    from peft_restorelcc.training.trainer import PaddingCollator, RecoveryTrainer, pad_token_id_of

    network, tokenizer = pipeline.load(model, dtype="float32", device="cpu")
    torch.manual_seed(0)  # the same adapter in both processes: the chunked and one-call losses must agree
    adapter = get_peft_model(network, RestoreLCCConfig(init_weights="gaussian", task_type="CAUSAL_LM")).train()
    dataset = pipeline.training_data("text", tokenizer, samples=TEXT_STEP, seq_len=TEXT_STEP_LEN)
    batch = PaddingCollator(pad_token_id_of(tokenizer))([dataset[index] for index in range(TEXT_STEP)])
    with tempfile.TemporaryDirectory() as scratch:
        arguments = TrainingArguments(output_dir=scratch, report_to=[], use_cpu=True)
        trainer = RecoveryTrainer(model=adapter, args=arguments, **({} if chunked else {"head_chunk_threshold": None}))
        timer = recovery.StageTimer()
        with timer.stage("step"):
            loss = trainer.compute_loss(adapter, dict(batch))
            loss.backward()
    labelled = int((batch["labels"][:, 1:] != -100).sum())
    return {"peak_gib": timer.peak_rss_gib["step"], "loss": round(float(loss), 6), "labelled_tokens": labelled,
            "seconds": round(timer.seconds["step"], 2)}  # fmt: skip


def measure_text_step(name: str, model: str, model_gib: float) -> list[dict]:
    rows = []
    for chunked in (True, False):
        command = [sys.executable, __file__, "--text-step-child", model, "chunked" if chunked else "one-call"]
        completed = subprocess.run(command, capture_output=True, text=True)
        result = (json.loads(completed.stdout.strip().splitlines()[-1]) if completed.returncode == 0
                  else {"failed": completed.stderr.strip().splitlines()[-1:] or ["killed"]})  # fmt: skip
        row = {"config": name, "model_fp32_gib": round(model_gib, 3), "head": "chunked" if chunked else "one call",
               **result}  # fmt: skip
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [row for row in rows if "peak_gib" in row]
    labels = [row["config"] + (" (eval batch 16)" if row["flags"] else "") for row in measured]
    figure, axis = plt.subplots(figsize=(9, 0.45 * len(measured) + 1.5))
    axis.barh(labels, [row["peak_gib"] for row in measured], label="peak resident memory")
    axis.scatter([row["target_gib"] for row in measured], labels, color="black", marker="|", s=200, label="target")
    axis.set_xlabel("GiB")
    axis.legend(loc="upper right")
    axis.invert_yaxis()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default=",".join([*EMBEDDED, *RANDOM_CONFIGS]))
    parser.add_argument("--old-eval-batch", action="store_true", help="also run each at the former lm-eval batch 16")
    parser.add_argument("--text-step", action="store_true", help="one plain-text training step, head chunked or not")
    parser.add_argument("--text-step-child", nargs=2, metavar=("MODEL", "HEAD"), help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, default=None, help="default: results/memory.json (--text-step: "
                        "results/memory-text-step.json)")  # fmt: skip
    args = parser.parse_args()
    args.output = args.output or RESULTS / ("memory-text-step.json" if args.text_step else "memory.json")
    if args.text_step_child:
        print(json.dumps(text_step(args.text_step_child[0], args.text_step_child[1] == "chunked")))
        return
    names = [name for name in args.configs.split(",") if name]
    unknown = [name for name in names if name not in EMBEDDED and name not in RANDOM_CONFIGS]
    if unknown:
        parser.error(f"unknown configurations {unknown}; known: {[*EMBEDDED, *RANDOM_CONFIGS]}")
    margin = libraries_gib() + LOGITS_FLOOR_GIB
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        for name in names:
            model = name if name in EMBEDDED else str(random_model(name, scratch / "models"))
            model_gib = fp32_model_gib(model)
            if args.text_step:
                rows.extend(measure_text_step(name, model, model_gib))
                continue
            for extra in ([], ["--eval-batch-size", "16"]) if args.old_eval_batch else ([],):
                row = measure(name, model, model_gib, margin, scratch / f"run-{name}-{len(extra)}", extra)
                row["target_gib"] = round(TARGET_FACTOR * model_gib + margin, 3)
                rows.append(row)
    report = {
        "about": __doc__.split("\n\n")[2].replace("\n", " "),
        "command": "python benchmarks/memory.py " + " ".join(sys.argv[1:]),
        "workload": WORKLOAD,
        "target": f"peak <= {TARGET_FACTOR} x fp32 model + margin",
        "margin_gib": round(margin, 3),
        "machine": {"cpu": _cpu_model(), "cores": os.cpu_count()},
        "rows": rows,
    }
    if args.text_step:
        report |= {"about": __doc__.split("\n\n")[4].replace("\n", " "), "workload": [TEXT_STEP, TEXT_STEP_LEN]}
        report.pop("target")
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    written = [args.output]
    if not args.text_step:
        plot(rows, args.output.with_suffix(".png"))
        written.append(args.output.with_suffix(".png"))
    print("wrote " + " and ".join(map(str, written)))


def _cpu_model() -> str:
    try:
        match = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
    except OSError:
        return "unknown"
    return match.group(1).strip() if match else "unknown"


if __name__ == "__main__":
    main()
