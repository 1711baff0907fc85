"""``restorelcc run``: the whole job, load -> prune -> calibrate -> adapter -> train -> evaluate -> merge, one
stage after the other (``stages``), with its summary written beside the models."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..calibration import LostComponents
from ..evaluation.statistics import StageTimer, trainable_parameters
from ..io import load_model, name_model_source
from ..io.checks import write_json_atomic
from ..io.devices import default_device
from ..io.export import changed_quantized_tensors, quantized_tensors
from ..pruning import measure_sparsity, save_pruned
from .settings import RunSettings
from .stages import build_adapter, calibrate_components, evaluate, export, load, prune, train, training_data


def _evaluate_all(settings: RunSettings) -> dict[str, Any]:
    return dict(
        tasks=list(settings.tasks) if settings.tasks else None,
        limit=settings.limit or None,
        perplexity_passages=settings.perplexity_passages,
        batch_size=settings.eval_batch_size,
        per_item=True,  # the three models answer the same items: their errors can be paired
        include_path=settings.include_path,
    )


def _calibrate_stage(
    settings: RunSettings, dense: nn.Module, pruned: nn.Module, tokenizer: Any, report: dict[str, Any], output: Path
) -> LostComponents:
    components = calibrate_components(
        dense, pruned, tokenizer, report, settings.calibration_samples, settings.num_pairs, settings.strategy,
        seed=settings.seed,
    )  # fmt: skip
    components.save(output / "lost_components")
    return components


def _train_stage(
    settings: RunSettings, pruned: nn.Module, components: LostComponents, tokenizer: Any, teacher: nn.Module | None,
    output: Path, device: torch.device,
) -> tuple[nn.Module, dict[str, Any]]:  # fmt: skip
    model = build_adapter(pruned, components, settings.heads, selection=settings.selection, init=settings.init)
    dataset = training_data(settings.data, tokenizer, samples=settings.train_samples, seed=settings.seed)
    metrics = train(
        model, tokenizer, dataset, output / "adapter", checkpoint_dir=output / CHECKPOINTS_DIR,
        epochs=settings.epochs, learning_rate=settings.lr,
        batch_size=settings.batch_size, max_steps=settings.train_steps, seed=settings.seed, teacher=teacher,
        distill_alpha=settings.distill_alpha if teacher is not None else 1.0, device=device,
    )  # fmt: skip
    return model, metrics


def run_job(settings: RunSettings, output: str | os.PathLike) -> dict[str, Any]:
    """The main job: prune ``settings.model``, evaluate dense and pruned, calibrate, train, evaluate the restored
    model, merge. Writes pruned/, lost_components/, adapter/, merged/ and results.json under ``output``; returns
    the summary written to results.json.

    The stage order is part of the results: evaluation reseeds torch's global generator, and the adapter's
    initialisation draws from it after the pruned model's evaluation, so the adapter must be built after that
    evaluation. Pruning and calibration draw from their own seeded generators, so the dense model is evaluated first,
    before pruning makes the second copy (same numbers, one model less in memory while it is scored).
    """
    device = default_device(settings.device)
    torch.manual_seed(settings.seed)
    output, timer, evaluate_options = Path(output), StageTimer(), _evaluate_all(settings)
    results: dict[str, Any] = {}
    with timer.stage("load"):
        dense, tokenizer = load(settings.model, revision=settings.revision, dtype=settings.dtype, device=device)
    with timer.stage("evaluate dense"):
        # Before pruning makes a second copy: the dense model's scoring holds one model, not two.
        results["dense"] = evaluate(dense, tokenizer, **evaluate_options)
    with timer.stage("prune"):
        sparsity = None if settings.pattern else settings.sparsity
        pruned, report = prune(dense, tokenizer, settings.method, sparsity, settings.pattern, settings.prune_samples)
        save_pruned(pruned, tokenizer, output / "pruned", report)
    with timer.stage("calibrate"):
        components = _calibrate_stage(settings, dense, pruned, tokenizer, report, output)
    teacher = dense if settings.distill_alpha > 0 else None
    del dense  # the teacher keeps it when distilling; otherwise its memory goes to training
    with timer.stage("evaluate pruned"):
        results["pruned"] = evaluate(pruned, tokenizer, **evaluate_options)
    sparsity_before = measure_sparsity(pruned)["overall_sparsity"]
    if settings.quantization:
        del pruned  # its copy on disk (pruned/) is what gets quantized
        pruned, results["pruned_quantized"] = _quantize_stage(settings, tokenizer, output, device, timer)
    with timer.stage("train"):
        model, train_metrics = _train_stage(settings, pruned, components, tokenizer, teacher, output, device)
    with timer.stage("evaluate restored"):
        results["restored"] = evaluate(model, tokenizer, **evaluate_options)
    trainable = trainable_parameters(model)  # counted before merging, which folds the adapter away
    with timer.stage("merge"):
        if settings.quantization:
            merged_dir, fresh, changed = _merge_quantized(settings, output, tokenizer, device)
            sparsity_after = sparsity_before if not changed else None
        else:
            merged_dir = export(model, output / "merged", tokenizer=tokenizer)
            sparsity_after = measure_sparsity(model.get_base_model())["overall_sparsity"]
    summary = _summary(settings, output, report, model, results, train_metrics, timer, merged_dir)
    summary.update(
        trainable_parameters=trainable, sparsity_before_merge=sparsity_before, sparsity_after_merge=sparsity_after
    )
    if settings.quantization:
        summary.update(quantized_tensors=len(fresh), quantized_tensors_changed_by_merge=changed)
    write_json_atomic(output / "results.json", json.loads(json.dumps(summary, default=str)))
    # The optimizer state is of no use once the run has finished, and must not travel with the adapter.
    shutil.rmtree(output / CHECKPOINTS_DIR, ignore_errors=True)
    return summary


def _quantized_pruned(settings: RunSettings, output: Path, device: torch.device) -> nn.Module:
    """The saved pruned model (pruned/) loaded quantized by bitsandbytes, whole on ``device``."""
    device_map = "cpu" if device.type == "cpu" else {"": device.index or 0}
    model = load_model(output / "pruned", dtype=settings.dtype, device_map=device_map, quantization=settings.quantization)
    name_model_source(model, (output / "pruned").resolve())
    return model


def _quantize_stage(
    settings: RunSettings, tokenizer: Any, output: Path, device: torch.device, timer: Any
) -> tuple[nn.Module, dict[str, Any]]:
    """The pruned model quantized: evaluated from one load, trained on a second (an eval forward makes bitsandbytes'
    CPU backend repack 4-bit weights, after which they pass no gradient). Returns the model to train and the
    evaluation."""
    from peft import prepare_model_for_kbit_training

    with timer.stage("evaluate pruned quantized"):
        evaluation = evaluate(_quantized_pruned(settings, output, device), tokenizer, **_evaluate_all(settings))
    with timer.stage("quantize"):
        model = prepare_model_for_kbit_training(
            _quantized_pruned(settings, output, device), use_gradient_checkpointing=False
        )
    return model, evaluation


def _merge_quantized(
    settings: RunSettings, output: Path, tokenizer: Any, device: torch.device
) -> tuple[Path, dict[str, torch.Tensor], list[str]]:
    """The trained adapter (adapter/) merged into the pruned model freshly quantized, as `restorelcc merge
    --quantization` does (the trained model's own layers went through evaluation forwards, which on the CPU repack
    4-bit weights). Returns the merged directory, the quantized tensors as loaded, and the names of those the saved
    merged model holds with other bits (none expected: a merge writes only biases)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = _quantized_pruned(settings, output, device)
    fresh = quantized_tensors(base)
    merged_dir = export(
        PeftModel.from_pretrained(base, str(output / "adapter")), output / "merged", tokenizer=tokenizer
    )
    reloaded = AutoModelForCausalLM.from_pretrained(merged_dir, device_map=base.device.type)
    return merged_dir, fresh, changed_quantized_tensors(fresh, quantized_tensors(reloaded))


def _summary(
    settings: RunSettings, output: Path, report: dict[str, Any], model: nn.Module, results: dict[str, Any],
    train_metrics: dict[str, Any], timer: StageTimer, merged_dir: Path,
) -> dict[str, Any]:  # fmt: skip
    return {
        "model": settings.model,
        "pruning": {key: report.get(key) for key in ("method", "sparsity_target", "pattern")},
        "heads": model.peft_config["default"].heads,
        "settings": asdict(settings) | {"output": str(output)},
        "results": results,
        "train": train_metrics,
        "stage_seconds": timer.seconds,
        "stage_peak_rss_gib": timer.peak_rss_gib,
        "peak_rss_gib": timer.process_peak_rss_gib,
        "stage_peak_gpu_gib": timer.peak_gpu_gib,
        "paths": {name: str(output / name) for name in ("pruned", "lost_components", "adapter")}
        | {"merged": str(merged_dir)},
    }

# Training checkpoints of run_job: beside adapter/, not in it (a folder upload of the adapter would publish them).
CHECKPOINTS_DIR = "checkpoints"
