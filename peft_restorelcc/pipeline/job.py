"""``restorelcc run``: the whole job, load -> prune -> calibrate -> adapter -> train -> evaluate -> merge, one
stage after the other (``stages``), each recorded in stages.json so that ``--resume`` reuses it, with its summary
written beside the models."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from peft import prepare_model_for_kbit_training
from torch import nn

from ..calibration import LostComponents
from ..evaluation.statistics import StageTimer, trainable_parameters
from ..io import load_model, load_tokenizer, name_model_source, resolve_model_path
from ..io.adapters import record_base
from ..io.checks import write_json_atomic
from ..io.devices import default_device
from ..io.export import changed_quantized_tensors, quantized_tensors
from ..io.stages import StageRecord
from ..pruning import load_report, measure_sparsity, save_pruned
from .settings import RunSettings
from .stages import (
    build_adapter,
    calibrate_components,
    evaluate,
    export,
    load,
    prune,
    train,
    training_data,
)

# Training checkpoints of run_job: beside adapter/, not in it (a folder upload of the adapter would publish them).
CHECKPOINTS_DIR = "checkpoints"


def _evaluate_all(settings: RunSettings) -> dict[str, Any]:
    return dict(
        tasks=list(settings.tasks) if settings.tasks else None,
        limit=settings.limit or None,
        perplexity_passages=settings.perplexity_passages,
        batch_size=settings.eval_batch_size,
        per_item=True,  # the three models answer the same items: their errors can be paired
        include_path=settings.include_path,
    )


# What each stage of run_job depends on: the settings that shape its output (its own and those of every stage it
# reads), and which stages read its output. A stage whose settings changed is redone on --resume, with its readers.
_LOAD = ("model", "revision", "dtype", "seed")
_EVALUATE = ("tasks", "include_path", "limit", "perplexity_passages")
_PRUNE = (*_LOAD, "method", "sparsity", "pattern", "prune_samples")
_CALIBRATE = (*_PRUNE, "calibration_samples", "num_pairs", "strategy")
_TRAIN = (*_CALIBRATE, "heads", "selection", "init", "train_samples", "train_steps", "epochs", "batch_size", "lr",
          "data", "distill_alpha", "quantization")  # fmt: skip
STAGE_SETTINGS = {
    "evaluate dense": (*_LOAD, *_EVALUATE),
    "prune": _PRUNE,
    "calibrate": _CALIBRATE,
    "evaluate pruned": (*_PRUNE, *_EVALUATE),
    "evaluate pruned quantized": (*_PRUNE, *_EVALUATE, "quantization"),
    "train": _TRAIN,
    "evaluate restored": (*_TRAIN, *_EVALUATE),
    "merge": _TRAIN,
}
STAGE_READERS = {
    "prune": ("calibrate", "evaluate pruned", "evaluate pruned quantized", "train"),
    "calibrate": ("train",),
    "train": ("evaluate restored", "merge"),
}
TRAIN_STARTED = "train started"  # checkpoints under checkpoints/ were written with these settings


class _Job:
    """One ``run_job``: its settings, output, device, timer and stage record; one method per stage, each reusing
    what an earlier run recorded under the same settings (``resume``) or doing the work and recording it."""

    def __init__(self, settings: RunSettings, output: Path, resume: bool, log: Callable[[str], None]) -> None:
        self.settings, self.output, self.timer = settings, output, StageTimer()
        self.device = default_device(settings.device)
        readers = {**STAGE_READERS, "train": (*STAGE_READERS["train"], TRAIN_STARTED)}
        self.stages = StageRecord(output, readers, resume=resume, log=log)

    def key(self, stage: str) -> dict[str, Any]:
        settings = asdict(self.settings)
        return {name: settings[name] for name in STAGE_SETTINGS.get(stage, STAGE_SETTINGS["train"])}

    def evaluation(self, stage: str, model: nn.Module | Callable[[], nn.Module], tokenizer: Any) -> dict[str, Any]:
        """The recorded evaluation of ``stage``, or ``model`` (a model, or a function that loads it) evaluated and
        recorded."""
        with self.timer.stage(stage):
            recorded = self.stages.reuse(stage, self.key(stage))
            if recorded is not None:
                return recorded
            evaluation = evaluate(model if isinstance(model, nn.Module) else model(), tokenizer,
                                  **_evaluate_all(self.settings))  # fmt: skip
            return self.stages.record(stage, self.key(stage), json.loads(json.dumps(evaluation, default=str)))

    def needs_dense(self) -> bool:
        done = all(self.stages.reusable(stage, self.key(stage)) for stage in ("evaluate dense", "prune", "calibrate"))
        return not done or self.settings.distill_alpha > 0

    def pruned(self, dense: nn.Module | None, tokenizer: Any) -> tuple[nn.Module, dict[str, Any]]:
        """The pruned model and its report: pruned/ as saved, or ``dense`` pruned now and saved there."""
        directory = self.output / "pruned"
        with self.timer.stage("prune"):
            if self.stages.reuse("prune", self.key("prune"), directory) is not None:
                pruned = load_model(directory, dtype=self.settings.dtype).to(self.device)
                name_model_source(pruned, directory.resolve())
                return pruned.eval(), load_report(directory)
            settings = self.settings
            sparsity = None if settings.pattern else settings.sparsity
            pruned, report = prune(dense, tokenizer, settings.method, sparsity, settings.pattern, settings.prune_samples)
            shutil.rmtree(directory, ignore_errors=True)  # an earlier run's, under other settings
            save_pruned(pruned, tokenizer, directory, report)
            self.stages.record("prune", self.key("prune"))
            return pruned, report

    def components(self, dense: nn.Module | None, pruned: nn.Module, tokenizer: Any, report: dict[str, Any]) -> Any:
        directory = self.output / "lost_components"
        with self.timer.stage("calibrate"):
            if self.stages.reuse("calibrate", self.key("calibrate"), directory) is not None:
                return LostComponents.load(directory)
            settings = self.settings
            components = calibrate_components(
                dense, pruned, tokenizer, report, settings.calibration_samples, settings.num_pairs, settings.strategy,
                seed=settings.seed,
            )  # fmt: skip
            shutil.rmtree(directory, ignore_errors=True)
            components.save(directory)
            self.stages.record("calibrate", self.key("calibrate"))
            return components

    def trained(
        self, pruned: nn.Module, components: Any, tokenizer: Any, teacher: nn.Module | None
    ) -> tuple[nn.Module, dict[str, Any]]:
        """The trained adapter on ``pruned`` and its training metrics: adapter/ as saved, or trained now (from the
        last checkpoint of an interrupted training under the same settings)."""
        from peft import PeftModel

        adapter, checkpoints, key = self.output / "adapter", self.output / CHECKPOINTS_DIR, self.key("train")
        with self.timer.stage("train"):
            recorded = self.stages.reuse("train", key, adapter)
            if recorded is not None:
                return PeftModel.from_pretrained(pruned, str(adapter), is_trainable=True), recorded
            resume = self.stages.reusable(TRAIN_STARTED, key) and any(checkpoints.glob("checkpoint-*"))
            if resume:
                self.stages.log(f"resume: training continues from the last checkpoint in {checkpoints}")
            else:
                shutil.rmtree(checkpoints, ignore_errors=True)
                self.stages.record(TRAIN_STARTED, key)
            # Seeded here, not by the evaluations before it: a resumed job that skips them draws the same adapter.
            torch.manual_seed(self.settings.seed)
            settings = self.settings
            model = build_adapter(pruned, components, settings.heads, selection=settings.selection, init=settings.init)
            record_base(model, pruned.name_or_path)  # pruned/, as saved: its path and weights fingerprint
            dataset = training_data(settings.data, tokenizer, samples=settings.train_samples, seed=settings.seed)
            metrics = train(
                model, tokenizer, dataset, adapter, checkpoint_dir=checkpoints, epochs=settings.epochs,
                learning_rate=settings.lr, batch_size=settings.batch_size, max_steps=settings.train_steps,
                seed=settings.seed, teacher=teacher, distill_alpha=settings.distill_alpha if teacher is not None else 1.0,
                device=self.device, save_steps=RUN_SAVE_STEPS, resume_from_checkpoint=True if resume else None,
            )  # fmt: skip
            return model, self.stages.record("train", key, json.loads(json.dumps(metrics, default=str)))

    def merged(self, model: nn.Module, tokenizer: Any, sparsity_before: float) -> dict[str, Any]:
        """Merge into merged/ (or reuse it): what the summary reports of the merge."""
        directory = self.output / "merged"
        with self.timer.stage("merge"):
            recorded = self.stages.reuse("merge", self.key("merge"), directory)
            if recorded is not None:
                return recorded
            shutil.rmtree(directory, ignore_errors=True)
            if self.settings.quantization:
                _, fresh, changed = _merge_quantized(self.settings, self.output, tokenizer, self.device)
                merge = {"sparsity_after_merge": sparsity_before if not changed else None,
                         "quantized_tensors": len(fresh), "quantized_tensors_changed_by_merge": changed}  # fmt: skip
            else:
                export(model, directory, tokenizer=tokenizer)
                merge = {"sparsity_after_merge": measure_sparsity(model.get_base_model())["overall_sparsity"]}
            return self.stages.record("merge", self.key("merge"), merge)


# Checkpoints every 50 steps: a run killed while training loses at most 50 steps (RestoreLCC's are small).
RUN_SAVE_STEPS = 50


def run_job(
    settings: RunSettings, output: str | os.PathLike, resume: bool = False, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """The main job: prune ``settings.model``, evaluate dense and pruned, calibrate, train, evaluate the restored
    model, merge. Writes pruned/, lost_components/, adapter/, merged/, stages.json and results.json under
    ``output``; returns the summary written to results.json.

    Every finished stage is recorded in stages.json with the settings that made it. With ``resume`` the stages
    recorded under today's settings are reused (each says so through ``log``) and the rest are redone, with every
    stage that reads their output; an interrupted training continues from its last checkpoint. A resumed job writes
    the results.json of an uninterrupted one, but for timings: the adapter is seeded right before it is built, and
    the dense model is evaluated before pruning makes a second copy (one model less in memory while it is scored).
    """
    output = Path(output)
    job = _Job(settings, output, resume, log)
    torch.manual_seed(settings.seed)
    results: dict[str, Any] = {}
    dense = None
    with job.timer.stage("load"):
        if job.needs_dense():
            dense, tokenizer = load(settings.model, revision=settings.revision, dtype=settings.dtype, device=job.device)
        else:  # every stage that reads the dense model is reused: its tokenizer is all that is needed
            tokenizer = load_tokenizer(resolve_model_path(settings.model, settings.revision))
    # Before pruning makes a second copy: the dense model's scoring holds one model, not two.
    results["dense"] = job.evaluation("evaluate dense", dense, tokenizer)
    pruned, report = job.pruned(dense, tokenizer)
    components = job.components(dense, pruned, tokenizer, report)
    teacher = dense if settings.distill_alpha > 0 else None
    del dense  # the teacher keeps it when distilling; otherwise its memory goes to training
    results["pruned"] = job.evaluation("evaluate pruned", pruned, tokenizer)
    sparsity_before = measure_sparsity(pruned)["overall_sparsity"]
    if settings.quantization:
        del pruned  # its copy on disk (pruned/) is what gets quantized
        quantized = lambda: _quantized_pruned(settings, output, job.device)  # noqa: E731
        results["pruned_quantized"] = job.evaluation("evaluate pruned quantized", quantized, tokenizer)
        with job.timer.stage("quantize"):
            # A second load: an eval forward makes bitsandbytes' CPU backend repack 4-bit weights, after which they
            # pass no gradient.
            pruned = prepare_model_for_kbit_training(quantized(), use_gradient_checkpointing=False)
    model, train_metrics = job.trained(pruned, components, tokenizer, teacher)
    results["restored"] = job.evaluation("evaluate restored", model, tokenizer)
    trainable = trainable_parameters(model)  # counted before merging, which folds the adapter away
    merge = job.merged(model, tokenizer, sparsity_before)
    summary = _summary(settings, output, report, model, results, train_metrics, job.timer, output / "merged")
    summary.update(trainable_parameters=trainable, sparsity_before_merge=sparsity_before, **merge)
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
