"""The restore pipeline, stage by stage, and the one place that strings the stages together.

load -> prune -> calibrate (lost components + head selection) -> build adapter -> train -> evaluate -> export.

Every stage takes models and data as arguments and returns what the next one needs; only :func:`load` reads a
model by name (through ``peft_restorelcc.io``: embedded name, local directory or Hub id). ``restorelcc run``,
``calibrate`` and ``train``, ``benchmarks/recovery.py`` and ``benchmarks/task_specific.py`` all call these, so
what the benchmarks measure is what users run. :func:`run_job` is the whole ``restorelcc run`` job.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .calibration import (
    CalibrationInputs,
    LostComponents,
    build_restorelcc_model,
    calibration_inputs,
    refine_lost_init,
)
from .calibration import calibrate as run_calibration
from .data import text_passages
from .evaluation.statistics import StageTimer, trainable_parameters
from .evaluation.tasks import evaluate_tasks, perplexity
from .io import load_model, load_tokenizer, model_reference, name_model_source, resolve_model_path
from .io.checks import write_json_atomic
from .io.devices import default_device
from .io.export import changed_quantized_tensors, quantized_tensors, save_merged
from .pruning import calibration_windows, measure_sparsity, prune_model, save_pruned
from .training import build_train_dataset, train_adapter

__all__ = [
    "RunSettings",
    "build_adapter",
    "calibrate",
    "calibrate_components",
    "calibration_inputs",
    "evaluate",
    "evaluate_model",
    "export",
    "load",
    "prune",
    "prune_copy",
    "run_job",
    "train",
    "training_data",
]

# Training checkpoints of run_job: beside adapter/, not in it (a folder upload of the adapter would publish them).
CHECKPOINTS_DIR = "checkpoints"

# ------------------------------------------------------------------------------------------------ load / prune


def load(
    name_or_path: str | os.PathLike,
    *,
    revision: str | None = None,
    dtype: torch.dtype | str | None = "auto",
    device: str | torch.device | None = None,
) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` from an embedded name, a local directory or a Hub id at ``revision``; the model in
    eval mode, moved to ``device`` when given."""
    path = resolve_model_path(name_or_path, revision)  # resolved once: a Hub id is looked up a single time
    tokenizer = load_tokenizer(path)
    model = load_model(path, dtype=dtype)
    name_model_source(model, model_reference(name_or_path, path))  # a Hub id as given, else the absolute directory
    return (model.to(device) if device is not None else model), tokenizer


def prune(
    dense: nn.Module,
    tokenizer: Any,
    method: str = "wanda",
    sparsity: float | None = 0.5,
    pattern: str | None = None,
    samples: int = 64,
    seq_len: int = 128,
) -> tuple[nn.Module, dict[str, Any]]:
    """A pruned deep copy of ``dense`` (the dense model stays as it is) and the pruning report."""
    pruned = copy.deepcopy(dense)
    windows = None
    if method != "magnitude":  # magnitude pruning needs no activations
        windows = calibration_windows(tokenizer, text_passages("train"), samples, seq_len)
    report = prune_model(pruned, method, sparsity, pattern=pattern, calibration_input_ids=windows)
    return pruned.eval(), report


# The name recovery and the benchmarks have always called it by.
prune_copy = prune


# ------------------------------------------------------------------------------------------------ calibrate


def pruning_metadata(report: dict[str, Any] | None) -> dict[str, Any]:
    """What calibration records about the pruning: method, target sparsity and pattern from a pruning report."""
    report = report or {}
    return {key: report.get(key) for key in ("method", "sparsity_target", "pattern") if key in report}


def calibrate(
    dense: Any,
    pruned: Any,
    tokenizer: Any,
    inputs: CalibrationInputs,
    *,
    strategy: str = "probe",
    seed: int = 0,
    **options: Any,
) -> LostComponents:
    """Lost components of every head of ``pruned`` against ``dense`` (models, or ``ModelLoader`` s that load them
    one at a time), on ``inputs`` (:func:`calibration_inputs`), with the heads scored by ``strategy``.

    ``options`` go to ``calibration.calibrate`` (``position``, ``kept_heads``, ``pruning``, ``batch_size``,
    ``max_length``, ``pruned_tokenizer`` ...); those left out keep its defaults.
    """
    pairs = inputs.pairs if strategy == "probe" else None
    return run_calibration(dense, pruned, inputs.prompts, tokenizer, pairs=pairs, strategy=strategy, seed=seed, **options)


def calibrate_components(
    dense: nn.Module,
    pruned: nn.Module,
    tokenizer: Any,
    pruning_report: dict[str, Any] | None = None,
    samples: int = 128,
    pairs: int = 256,
    strategy: str = "probe",
    position: str = "last",
    seed: int = 0,
    kept_heads: dict[int, list[int]] | None = None,
) -> LostComponents:
    """:func:`calibrate` on the bundled training-side data, as ``restorelcc run`` calibrates: ``samples`` prompts,
    ``pairs`` probe pairs with a random wrong answer per item."""
    inputs = calibration_inputs(
        samples=samples, pairs=pairs, probe=strategy == "probe", negatives="random", seed=seed, verbose=False
    )
    report = pruning_report or {}
    return calibrate(
        dense,
        pruned,
        tokenizer,
        inputs,
        strategy=strategy,
        seed=seed,
        position=position,
        kept_heads=kept_heads or report.get("kept_heads"),
        pruning=pruning_metadata(report),
    )


# ------------------------------------------------------------------------------------------------ adapter / train


def build_adapter(
    pruned: nn.Module,
    components: LostComponents,
    num_heads: int | float,
    *,
    selection: str = "top",
    init: str = "paper",
    num_components: int | None = None,
    refine: dict[str, Any] | None = None,
) -> nn.Module:
    """A RestoreLCC ``PeftModel`` on ``pruned`` over the ``num_heads`` best-scored heads of ``components``.

    ``init``: ``paper`` (N(0, init_std)), ``lost`` (the mean lost vector) or ``lost-sequential`` (the same,
    re-measured layer by layer with the layers below compensated; ``refine`` then holds ``dense``, ``prompts``,
    ``tokenizer`` and optionally ``batch_size`` / ``max_length`` for ``calibration.refine_lost_init``).
    """
    model = build_restorelcc_model(
        pruned,
        components,
        num_heads=num_heads,
        selection=selection,
        init="paper" if init == "paper" else "lost",
        num_components=num_components,
    )
    if init == "lost-sequential":
        if not refine:
            raise ValueError("init 'lost-sequential' needs the dense model and the prompts to re-measure with.")
        options = dict(refine)
        refine_lost_init(model, options.pop("dense"), options.pop("prompts"), options.pop("tokenizer", None),
                         components=components, **options)  # fmt: skip
    return model


def training_data(data: str, tokenizer: Any, *, samples: int | None, seed: int = 0, seq_len: int = 128) -> Any:
    """Tokenized training sequences for ``data`` (a data choice, ``task:NAME`` or a user file)."""
    return build_train_dataset(data, tokenizer, samples=samples, seq_len=seq_len, seed=seed)


def train(model: nn.Module, tokenizer: Any, dataset: Any, output: str | os.PathLike, **options: Any) -> dict[str, Any]:
    """Train the adapter of ``model`` on ``dataset`` (``training.train_adapter``; ``options`` are its keywords),
    writing checkpoints and the trained adapter to ``output``. Returns the training metrics."""
    return train_adapter(model, tokenizer, dataset, output, **options)


# ------------------------------------------------------------------------------------------------ evaluate / export


def evaluate(
    model: nn.Module,
    tokenizer: Any,
    tasks: list[str] | None = None,
    limit: int | None = 100,
    perplexity_passages: int = 64,
    batch_size: int | str = "auto",
    per_item: bool = False,
    include_path: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Accuracy on the paper's tasks (lm-eval; or on ``tasks`` of lm-eval's registry or ``include_path``) and
    perplexity on held-out LAMBADA passages; with ``per_item``, each item's score too (see ``evaluate_tasks``), for
    paired standard errors."""
    model.eval()
    results = evaluate_tasks(
        model, tokenizer, tasks=tasks, limit=limit, batch_size=batch_size, per_item=per_item, include_path=include_path
    )
    if perplexity_passages:
        results["perplexity"] = perplexity(model, tokenizer, text_passages("heldout")[:perplexity_passages])
    return results


evaluate_model = evaluate


def export(model: nn.Module, output: str | os.PathLike, tokenizer: Any = None) -> Path:
    """The adapter merged into the output projections' biases, saved as a standard transformers directory."""
    return save_merged(model, output, tokenizer=tokenizer)


# ------------------------------------------------------------------------------------------------ the whole job


@dataclass
class RunSettings:
    """Everything ``restorelcc run`` does differently from one call to the next (its flags, by name)."""

    model: str = "smollm2-135m"
    revision: str | None = None
    method: str = "wanda"
    sparsity: float = 0.5
    pattern: str | None = None
    prune_samples: int = 64
    calibration_samples: int = 128
    num_pairs: int = 256
    strategy: str = "probe"
    heads: float = 0.25
    selection: str = "top"
    init: str = "paper"
    train_samples: int = 2000
    train_steps: int = 200
    epochs: float = 3.0
    batch_size: int = 8
    lr: float = 1e-3
    data: str = "instruction-and-cloze"
    distill_alpha: float = 0.0
    tasks: Sequence[str] | None = None
    include_path: str | None = None  # a folder of the user's own lm-eval task YAMLs
    limit: int | None = 100
    perplexity_passages: int = 64
    eval_batch_size: int | str = "auto"
    seed: int = 0
    device: str | None = None
    dtype: str = "auto"
    # A bitsandbytes format (io.QUANTIZATIONS): the pruned model is saved, reloaded quantized, evaluated as such,
    # and the adapter trained on it and merged into it (QLoRA-style); None: everything in dtype.
    quantization: str | None = None


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
