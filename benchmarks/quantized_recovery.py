"""RestoreLCC against QLoRA-style LoRA on a pruned, then bitsandbytes-quantized model: accuracy, and what the merge does
to the zeros and to the quantized tensors.

    python benchmarks/quantized_recovery.py              # smollm2-135m, wanda 50%, nf4, 20 steps, 4 tasks x 20 items
    python benchmarks/quantized_recovery.py --formats nf4,int8 --steps 40 --tasks all --limit 100

The model is pruned (``--prune``, Wanda 50%) in fp32 and saved; the lost components are calibrated on the dense and
pruned fp32 models (RestoreLCC only). For each format of ``--formats`` the saved pruned model is reloaded quantized by
bitsandbytes and evaluated, then for each method a fresh quantized copy goes through PEFT's k-bit recipe
(``prepare_model_for_kbit_training``), gets its adapter (RestoreLCC on ``--heads`` of the heads; LoRA r=``--lora-rank``
on every linear layer, compare.BUILDERS' LoRA) and trains ``--steps`` steps on the default training data at the
method's own learning rate (compare.METHODS). The adapter is then loaded twice onto fresh quantized copies of the
pruned model: one copy stays unmerged (its logits on a fixed batch of held-out text), the other is merged
(``merge_and_unload``: RestoreLCC writes o_proj biases; PEFT's LoRA dequantizes each weight, adds B@A and quantizes
again) and measured before any forward (bitsandbytes' CPU backend repacks 4-bit weights on the first forward), as
``restorelcc merge --quantization`` merges:

- every quantized tensor (``weight.data``, ``quant_state.absmax``, ``SCB``) against the freshly quantized base;
- the merged weights dequantized: their sparsity, and the share of the pruned (fp32) zeros that are still zero;
- the merged model saved (``save_pretrained``): size on disk, then reloaded by stock transformers, its quantized
  tensors compared again, its logits on the batch against the unmerged model's, and it is evaluated on ``--tasks``
  (bundled, first ``--limit`` items each; default the four SmolLM2 is above chance on) and held-out perplexity.

The unmerged copy is also merged in memory after its forward (4-bit weights repacked, as in tests/test_quantized.py):
its quantized tensors and logits against its own unmerged state. On the CPU the two merges differ for 4-bit bases:
the fresh merge computes the bias through the unpacked kernel (fp32 scales), the unmerged forward through the
repacked one, so their W @ shift differ by the repack's rounding.

Everything runs on the CPU (bitsandbytes' CPU backend, 4-bit layers computing in fp32). Results:
benchmarks/results/quantized_recovery.json and .png; ``benchmarks/report.py`` renders its table.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
FORMATS = ("nf4",)  # int8 doubles the run: --formats nf4,int8
METHODS = ("restorelcc", "lora")
# The bundled tasks SmolLM2-135M is above chance on (benchmarks/results/recovery.json): one core scores ~3 requests a
# second on bitsandbytes' CPU kernels, so the default run keeps to them.
TASKS = ("hellaswag", "arc_easy", "arc_challenge", "openbookqa")


def _size_mib(directory: Path) -> float:
    return sum(path.stat().st_size for path in directory.rglob("*") if path.is_file()) / 2**20


def fixed_batch(tokenizer: Any, rows: int = 4, length: int = 64) -> Any:
    """``rows`` x ``length`` token ids cut from held-out text: the batch merged and unmerged logits are compared on."""
    from peft_restorelcc.data import text_passages

    ids = tokenizer("\n\n".join(text_passages("heldout")[:16]), return_tensors="pt").input_ids[0]
    return ids[: rows * length].view(rows, length)


def pruned_zeros(model: Any) -> dict[str, Any]:
    """The zero mask of every decoder Linear of the fp32 pruned model (lm_head, tied and never pruned, left out)."""
    from torch import nn

    return {name: module.weight.detach() == 0 for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and not name.endswith("lm_head")}  # fmt: skip


def zero_stats(model: Any, zeros: dict[str, Any]) -> dict[str, Any]:
    """Over the quantized projections of ``model``, dequantized: the share of weights that are zero, and the share of
    the pruned model's zeros (``zeros``) still zero."""
    import torch
    from peft.utils.integrations import dequantize_bnb_weight

    from peft_restorelcc.tuner.heads import is_quantized_projection

    total = zero = kept = pruned = 0
    with torch.no_grad():
        for name, module in model.named_modules():
            if not is_quantized_projection(module):
                continue
            weight = dequantize_bnb_weight(module.weight, state=getattr(module, "state", None))
            is_zero, mask = weight == 0, zeros[name]
            total, zero = total + is_zero.numel(), zero + int(is_zero.sum())
            kept, pruned = kept + int((is_zero & mask).sum()), pruned + int(mask.sum())
    return {"sparsity": zero / total, "pruned_zeros_kept": kept / pruned if pruned else None,
            "zeros_not_from_pruning": (zero - kept) / total}  # fmt: skip


def quantized_state(model: Any) -> dict[str, Any]:
    """export.quantized_tensors, with LLM.int8's scales read where its first forward moved them (``weight.SCB`` to
    ``state.SCB``): a tensor that moved is not a tensor that changed."""
    from peft_restorelcc.io.export import quantized_tensors
    from peft_restorelcc.tuner.heads import is_quantized_projection

    tensors = quantized_tensors(model)
    for name, module in model.named_modules():
        scales = getattr(getattr(module, "state", None), "SCB", None)
        if is_quantized_projection(module) and f"{name}.SCB" not in tensors and scales is not None:
            tensors[f"{name}.SCB"] = scales.detach().cpu().clone()
    # A PeftModel's names (base_model.model. ... .base_layer) as the plain model's, so that the two compare.
    return {name.removeprefix("base_model.model.").replace(".base_layer", ""): tensor for name, tensor in tensors.items()}


def logits(model: Any, ids: Any) -> Any:
    import torch

    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def evaluation(model: Any, tokenizer: Any, args: argparse.Namespace) -> dict[str, Any]:
    from peft_restorelcc import pipeline
    from peft_restorelcc.evaluation import statistics as recovery

    results = pipeline.evaluate(model, tokenizer, tasks=args.tasks, limit=args.limit or None,
                                perplexity_passages=args.perplexity_passages)  # fmt: skip
    tasks = {task: metrics[recovery.headline_metric(metrics)] for task, metrics in results["tasks"].items()}
    return {"tasks": tasks, "avg_acc": recovery.headline_accuracy(results), "perplexity": results.get("perplexity")}


def run(args: argparse.Namespace, work: Path, progress: Any) -> dict[str, Any]:
    import torch
    from peft import PeftModel, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    import peft_restorelcc  # noqa: F401  (registers the tuner for PeftModel.from_pretrained)
    from peft_restorelcc import pipeline
    from peft_restorelcc.compare import runs as compare
    from peft_restorelcc.evaluation import statistics as recovery
    from peft_restorelcc.io import load_model
    from peft_restorelcc.io.export import changed_quantized_tensors
    from peft_restorelcc.pruning import save_pruned
    from peft_restorelcc.training.choices import DEFAULT_DATA

    started = time.perf_counter()
    torch.manual_seed(args.seed)
    rows: list[dict[str, Any]] = []

    def step(text: str) -> None:
        progress.set_postfix_str(text)

    step("load, prune")
    dense, tokenizer = pipeline.load(args.model, dtype="float32")
    method, sparsity, pattern = compare.parse_prune(args.prune)
    pruned, report = pipeline.prune(dense, tokenizer, method, sparsity, pattern, args.prune_samples)
    save_pruned(pruned, tokenizer, work / "pruned", report)
    progress.update()
    components = None
    if "restorelcc" in args.methods:
        step("calibrate")
        components = pipeline.calibrate_components(dense, pruned, tokenizer, report, args.calibration_samples,
                                                   args.pairs, seed=args.seed)  # fmt: skip
    del dense
    progress.update()
    step("evaluate pruned fp32")
    zeros = pruned_zeros(pruned)
    pruned_sparsity = sum(int(mask.sum()) for mask in zeros.values()) / sum(mask.numel() for mask in zeros.values())
    rows.append({"format": "fp32", "model": "pruned", **evaluation(pruned, tokenizer, args), "sparsity": pruned_sparsity,
                 "pruned_zeros_kept": 1.0, "size_mib": _size_mib(work / "pruned")})  # fmt: skip
    del pruned
    progress.update()
    ids = fixed_batch(tokenizer)

    def quantized(fmt: str) -> Any:
        return load_model(work / "pruned", dtype="float32", device_map="cpu", quantization=fmt)

    for fmt in args.formats:
        step(f"{fmt}: evaluate the pruned model quantized")
        base = quantized(fmt)
        fresh = quantized_state(base)  # before any forward: the CPU backend repacks 4-bit weights on the first one
        stats = zero_stats(base, zeros)
        base.save_pretrained(work / f"{fmt}-pruned")
        rows.append({"format": fmt, "model": "pruned", **evaluation(base, tokenizer, args), **stats,
                     "quantized_tensors": len(fresh), "size_mib": _size_mib(work / f"{fmt}-pruned")})  # fmt: skip
        del base
        progress.update()
        for name in args.methods:
            step(f"{fmt}: train {name}")
            model = prepare_model_for_kbit_training(quantized(fmt), use_gradient_checkpointing=False)
            torch.manual_seed(args.seed)
            if name == "restorelcc":
                model = pipeline.build_adapter(model, components, args.heads)
            else:
                model = compare.BUILDERS[name](model, compare.CompareSettings(lora_rank=args.lora_rank), None)
            trainable = recovery.trainable_parameters(model)
            dataset = pipeline.training_data(DEFAULT_DATA, tokenizer, samples=args.steps * args.batch_size, seed=args.seed)
            adapter = work / f"{fmt}-{name}"
            metrics = pipeline.train(
                model, tokenizer, dataset, adapter, learning_rate=compare.METHODS[name], batch_size=args.batch_size,
                max_steps=args.steps, seed=args.seed, save_steps=10**9, logging_steps=5, device="cpu",
            )  # fmt: skip
            del model
            step(f"{fmt}: merge {name}")
            # The unmerged model's first forward repacks its 4-bit weights (CPU backend); it is then merged in memory,
            # as the tests do: every tensor compared in the repacked layout, outputs with the same kernels.
            warm = PeftModel.from_pretrained(quantized(fmt), str(adapter))
            unmerged = logits(warm, ids)
            warm_before = quantized_state(warm)
            try:
                warm_merged = warm.merge_and_unload()
                warm_state = quantized_state(warm_merged)
                warm_changed = len(changed_quantized_tensors(warm_before, warm_state))
                warm_vs_fresh = len(changed_quantized_tensors(fresh, warm_state))
                warm_difference: Any = (logits(warm_merged, ids) - unmerged).abs().max().item()
            except Exception as error:  # noqa: BLE001 - what the library says is the measurement
                warm_changed, warm_vs_fresh = None, None
                warm_difference = f"{type(error).__name__}: {error}"[:200]
            del warm
            # What `restorelcc merge --quantization` does: merge into the checkpoint freshly quantized, before any
            # forward, and save.
            base = quantized(fmt)
            before = quantized_state(base)
            merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
            changed = changed_quantized_tensors(before, quantized_state(merged))
            stats = zero_stats(merged, zeros)
            merged.save_pretrained(work / f"{fmt}-{name}-merged")
            difference = (logits(merged, ids) - unmerged).abs().max().item()
            del merged, base
            step(f"{fmt}: evaluate {name} merged")
            reloaded = AutoModelForCausalLM.from_pretrained(work / f"{fmt}-{name}-merged", device_map="cpu",
                                                            dtype=torch.float32)  # fmt: skip
            changed_on_disk = changed_quantized_tensors(fresh, quantized_state(reloaded))
            reloaded_difference = (logits(reloaded, ids) - unmerged).abs().max().item()
            rows.append({
                "format": fmt, "model": name, **evaluation(reloaded, tokenizer, args), **stats,
                "quantized_tensors": len(before), "quantized_tensors_changed_by_merge": len(changed),
                "quantized_tensors_changed_on_disk": len(changed_on_disk),
                "size_mib": _size_mib(work / f"{fmt}-{name}-merged"),
                "max_logit_diff_merged_vs_unmerged": difference,
                "max_logit_diff_reloaded_vs_unmerged": reloaded_difference,
                "quantized_tensors_changed_by_merge_after_forward": warm_changed,
                "quantized_tensors_after_forward_merge_unlike_fresh": warm_vs_fresh,
                "max_logit_diff_merged_after_forward_vs_unmerged": warm_difference,
                "max_abs_logit_unmerged": unmerged.abs().max().item(),
                "trainable_parameters": trainable, "train_seconds": metrics.get("seconds"),
                "train_loss": metrics.get("train_loss"),
            })  # fmt: skip
            del reloaded
            progress.update()
    return {"rows": rows, "seconds": time.perf_counter() - started}


def plot(report: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    labels = [f"{row['model']}\n{row['format']}" for row in rows]
    figure, (accuracy, zeros) = plt.subplots(1, 2, figsize=(11, 4))
    accuracy.bar(labels, [row["avg_acc"] for row in rows], color="tab:blue")
    accuracy.set_ylim(min(row["avg_acc"] for row in rows) - 0.05, max(row["avg_acc"] for row in rows) + 0.02)
    accuracy.set_title(f"mean accuracy, first {report['settings']['limit']} items per task")
    zeros.bar(labels, [row["pruned_zeros_kept"] for row in rows], color="tab:green", label="pruned zeros kept")
    zeros.bar(labels, [row["sparsity"] for row in rows], color="none", edgecolor="black", label="sparsity")
    zeros.set_ylim(0, 1.05)
    zeros.set_title("after merge, weights dequantized")
    zeros.legend(loc="lower left")
    for axes in (accuracy, zeros):
        axes.tick_params(axis="x", labelsize=8)
    figure.suptitle(f"{report['settings']['model']}, {report['settings']['prune']}, "
                    f"{report['settings']['steps']} training steps, bitsandbytes on the CPU")  # fmt: skip
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="embedded name or local directory")
    parser.add_argument("--prune", default="wanda:0.5", help="METHOD:RATIO or METHOD:N:M (compare.parse_prune)")
    parser.add_argument("--formats", default=",".join(FORMATS), help="comma-separated bitsandbytes formats (io.QUANTIZATIONS)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated, of restorelcc, lora")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--heads", type=float, default=0.25, help="RestoreLCC: share (or number) of heads")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated bundled tasks; 'all': every one")
    parser.add_argument("--limit", type=int, default=20, help="first N items of each task")
    parser.add_argument("--perplexity-passages", type=int, default=8)
    parser.add_argument("--prune-samples", type=int, default=16)
    parser.add_argument("--calibration-samples", type=int, default=32)
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=str(RESULTS / "quantized_recovery.json"))
    args = parser.parse_args(argv)
    args.formats = [fmt.strip() for fmt in args.formats.split(",") if fmt.strip()]
    args.methods = [name.strip() for name in args.methods.split(",") if name.strip()]
    if set(args.methods) - set(METHODS):
        parser.error(f"--methods: give some of {', '.join(METHODS)}")
    args.tasks = None if args.tasks == "all" else args.tasks.split(",")

    import torch
    from tqdm import tqdm

    warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # LLM.int8 logs its fp16 cast on every matmul
    stages = 3 + len(args.formats) * (1 + len(args.methods))
    work = Path(tempfile.mkdtemp(prefix="quantized-recovery-"))
    try:
        with tqdm(total=stages, desc="quantized recovery") as progress:
            measured = run(args, work, progress)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    settings = {key: value for key, value in vars(args).items() if key != "output"}
    report = {
        "command": " ".join(["python", "benchmarks/quantized_recovery.py", *(argv if argv is not None else sys.argv[1:])]),
        "settings": settings,
        "device": "cpu",
        "torch_threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        **measured,
    }
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    plot(report, output.with_suffix(".png"))
    print(quantized_recovery_table(report))
    return 0


def quantized_recovery_table(report: dict[str, Any]) -> str:
    """The results file's rows as a markdown table (benchmarks/report.py renders the same)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from report import quantized_recovery_table as table

    return table(report)


if __name__ == "__main__":
    raise SystemExit(main())
