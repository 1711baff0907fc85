"""``restorelcc compare``: RestoreLCC against LoRA, DoRA and IA3 on one pruned model, same data, steps and seeds.

The dense model is loaded, pruned once (or the pruned model loaded), both evaluated once, the lost components
calibrated once (when RestoreLCC is compared), then every (method, seed) run builds its adapter with
``get_peft_model`` on a fresh copy of the pruned model, trains it on the same data for the same steps, is evaluated
on the same items, and is merged on a copy to measure the sparsity that survives. ``results.json`` is written after
every finished run; with ``resume`` the runs it holds under the same settings are kept, not redone.
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import pipeline, recovery
from .pruning import measure_sparsity, resolve_sparsity
from .training import DEFAULT_DATA

__all__ = ["METHODS", "CompareSettings", "compare", "compare_table", "parse_methods", "parse_prune", "plot_compare"]

SCHEMA_VERSION = 1
PRUNING_METHODS = ("magnitude", "wanda", "sparsegpt")
# Each method's standard learning rate (benchmarks/recovery_methods.yaml: the rates its rows train at).
METHODS: dict[str, float] = {"restorelcc": 1e-3, "lora": 5e-4, "dora": 5e-4, "ia3": 1e-3}
# Settings a run may differ in and still be kept on resume: what is run, not how it is measured.
PLAN_FIELDS = ("methods", "seeds", "device")


@dataclass
class CompareSettings:
    """Everything a comparison does differently from the next (``restorelcc compare``'s flags, by name)."""

    model: str = "smollm2-135m"
    revision: str | None = None
    pruned: str | None = None  # a pruned model to load; None: prune ``model`` with ``prune``
    pruned_revision: str | None = None
    prune: str = "wanda:0.5"
    methods: Sequence[str] = ("restorelcc", "lora")
    seeds: Sequence[int] = (0,)
    lora_rank: int = 8
    heads: float = 0.25
    learning_rates: dict[str, float] = field(default_factory=dict)  # per method; the rest keep METHODS' rates
    data: str = DEFAULT_DATA
    train_steps: int = 200
    batch_size: int = 8
    prune_samples: int = 64
    calibration_samples: int = 128
    num_pairs: int = 256
    tasks: Sequence[str] | None = None
    include_path: str | None = None  # a folder of the user's own lm-eval task YAMLs
    limit: int | None = 100
    perplexity_passages: int = 64
    eval_batch_size: int | str = "auto"
    device: str | None = None
    dtype: str = "auto"

    def learning_rate(self, method: str) -> float:
        return self.learning_rates.get(method, METHODS[method])


def parse_prune(spec: str) -> tuple[str, float | None, str | None]:
    """``wanda:0.5`` -> ``("wanda", 0.5, None)``; ``sparsegpt:2:4`` -> ``("sparsegpt", None, "2:4")``. ValueError
    with one line for an unknown method or a ratio outside (0, 1)."""
    method, _, shape = spec.partition(":")
    if method not in PRUNING_METHODS or not shape:
        raise ValueError(f"--prune {spec!r}: give METHOD:RATIO or METHOD:N:M, METHOD one of {list(PRUNING_METHODS)}")
    if ":" in shape:
        resolve_sparsity(None, shape)  # a malformed N:M pattern fails here
        return method, None, shape
    try:
        ratio = float(shape)
    except ValueError:
        raise ValueError(f"--prune {spec!r}: the ratio must be a number in (0, 1), e.g. {method}:0.5") from None
    if not 0 < ratio < 1:
        raise ValueError(f"--prune {spec!r}: the ratio must be in (0, 1), got {ratio}")
    return method, ratio, None


def parse_methods(text: str) -> list[str]:
    """``restorelcc,lora`` -> the method names, each known and given once."""
    methods = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in methods if name not in METHODS]
    if unknown or not methods or len(set(methods)) != len(methods):
        raise ValueError(f"--methods {text!r}: give each of {list(METHODS)} at most once, comma-separated")
    return methods


# ------------------------------------------------------------------------------------------------ the models


@dataclass
class _Models:
    """What every run shares: the dense and pruned models, the tokenizer, the pruning report, the components."""

    dense: nn.Module
    pruned: nn.Module
    tokenizer: Any
    report: dict[str, Any]
    device: torch.device
    components: Any = None


def _load_models(settings: CompareSettings, timer: recovery.StageTimer) -> _Models:
    from .assets import default_device
    from .io import resolve_model_path
    from .pruning import load_report

    device = default_device(settings.device)
    dense_path = resolve_model_path(settings.model, settings.revision)
    pruned_path = None if settings.pruned is None else resolve_model_path(settings.pruned, settings.pruned_revision)
    if pruned_path is not None:
        _check_same_architecture(dense_path, pruned_path)  # before any weights load
    with timer.stage("load"):
        dense, tokenizer = pipeline.load(dense_path, dtype=settings.dtype, device=device)
    if pruned_path is None:
        method, sparsity, pattern = parse_prune(settings.prune)
        with timer.stage("prune"):
            pruned, report = pipeline.prune(dense, tokenizer, method, sparsity, pattern, settings.prune_samples)
    else:
        with timer.stage("load"):
            pruned, _ = pipeline.load(pruned_path, dtype=settings.dtype, device=device)
        report = load_report(pruned_path) if (pruned_path / "pruning_report.json").is_file() else {}
    return _Models(dense, pruned, tokenizer, report, device)


# What a pruned copy shares with its dense model (pruning zeroes weights, it changes no shape).
SHAPE_KEYS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "vocab_size")  # fmt: skip


def _check_same_architecture(dense_path: Path, pruned_path: Path) -> None:
    from transformers import AutoConfig

    dense, pruned = (AutoConfig.from_pretrained(path).to_dict() for path in (dense_path, pruned_path))
    differ = [key for key in SHAPE_KEYS if dense.get(key) != pruned.get(key)]
    if differ:
        raise ValueError(f"--pruned is not a pruned copy of --model: their {', '.join(differ)} differ")


def _lora(model: nn.Module, settings: CompareSettings, dora: bool = False) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=settings.lora_rank, target_modules="all-linear", use_dora=dora, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def _ia3(model: nn.Module, settings: CompareSettings) -> nn.Module:
    from peft import IA3Config, get_peft_model

    return get_peft_model(model, IA3Config(task_type="CAUSAL_LM"))


def _restorelcc(model: nn.Module, settings: CompareSettings, models: _Models) -> nn.Module:
    return pipeline.build_adapter(model, models.components, settings.heads)


# A builder per method: (a fresh copy of the pruned model, the settings, the shared models) -> the PEFT model.
BUILDERS: dict[str, Callable[[nn.Module, CompareSettings, _Models], nn.Module]] = {
    "restorelcc": _restorelcc,
    "lora": lambda model, settings, _: _lora(model, settings),
    "dora": lambda model, settings, _: _lora(model, settings, dora=True),
    "ia3": lambda model, settings, _: _ia3(model, settings),
}


# ------------------------------------------------------------------------------------------------ measuring


def _evaluate(model: nn.Module, models: _Models, settings: CompareSettings) -> dict[str, Any]:
    """Headline accuracy per task, mean, perplexity and each item's score (every model answers the same items)."""
    results = pipeline.evaluate(
        model, models.tokenizer, tasks=list(settings.tasks) if settings.tasks else None, limit=settings.limit or None,
        perplexity_passages=settings.perplexity_passages, batch_size=settings.eval_batch_size, per_item=True,
        include_path=settings.include_path,
    )  # fmt: skip
    headline = {task: recovery.headline_metric(metrics) for task, metrics in results["tasks"].items()}
    return {
        "tasks": {task: results["tasks"][task][metric] for task, metric in headline.items()},
        "mean_accuracy": recovery.headline_accuracy(results),
        "perplexity": results.get("perplexity"),
        "items": {task: results["items"][task][metric] for task, metric in headline.items()},
    }


def _reference_rows(models: _Models, settings: CompareSettings, timer: recovery.StageTimer) -> dict[str, Any]:
    total = sum(parameter.numel() for parameter in models.pruned.parameters())
    rows = {}
    for name, model in (("dense", models.dense), ("pruned", models.pruned)):
        with timer.stage(f"evaluate {name}"):
            rows[name] = _evaluate(model, models, settings)
        rows[name] |= {"parameters": total, "sparsity": measure_sparsity(model)["overall_sparsity"]}
    return rows


def _run(method: str, seed: int, models: _Models, settings: CompareSettings, work: Path) -> dict[str, Any]:
    """One seed of one method: build, train, evaluate, merge on a copy; what results.json keeps of it."""
    timer = recovery.StageTimer()
    torch.manual_seed(seed)
    model = BUILDERS[method](copy.deepcopy(models.pruned), settings, models)
    samples = settings.train_steps * settings.batch_size
    dataset = pipeline.training_data(settings.data, models.tokenizer, samples=samples, seed=seed)
    with timer.stage("train"):
        metrics = pipeline.train(
            model, models.tokenizer, dataset, work / f"{method}-seed{seed}", learning_rate=settings.learning_rate(method),
            batch_size=settings.batch_size, max_steps=settings.train_steps, seed=seed, save_steps=10**9,
            logging_steps=10, device=models.device,
        )  # fmt: skip
    trainable = recovery.trainable_parameters(model)
    with timer.stage("evaluate"):
        measured = _evaluate(model, models, settings)
    with timer.stage("merge"):
        merged_sparsity = recovery.sparsity_after_merge(model)
    total = sum(parameter.numel() for parameter in models.pruned.parameters())
    return {
        "method": method, "seed": seed, **measured, "trainable_parameters": trainable,
        "trainable_percent": 100.0 * trainable / total, "sparsity_after_merge": merged_sparsity,
        "train_seconds": metrics.get("seconds", timer.seconds["train"]), "train_steps": metrics.get("steps"),
        "train_examples": len(dataset), "data": settings.data, "learning_rate": settings.learning_rate(method),
        "peak_rss_gib": timer.peak_rss_gib.get("train"), "peak_gpu_gib": timer.peak_gpu_gib.get("train"),
        "stage_seconds": timer.seconds,
    }  # fmt: skip


def _with_recovery(run: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
    """The run with its share of the dense-pruned gap recovered and that share's paired standard error."""
    dense, pruned = reference["dense"], reference["pruned"]
    share = recovery.gap_recovered(dense["mean_accuracy"], pruned["mean_accuracy"], run["mean_accuracy"])
    items = [{task: recovery.item_scores(scores) for task, scores in row["items"].items()}
             for row in (dense, pruned, run)]  # fmt: skip
    return run | {"gap_recovered": share, "gap_recovered_stderr": recovery.gap_recovered_stderr(*items)}


def summarise(runs: list[dict[str, Any]], methods: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per method, the mean over its seeds of every number, and the spread (sample SD) of the gap recovered."""
    summary = {}
    for method in methods:
        own = [run for run in runs if run["method"] == method]
        if not own:
            continue
        row: dict[str, Any] = {"seeds": [run["seed"] for run in own]}
        for key in ("mean_accuracy", "perplexity", "gap_recovered", "trainable_parameters", "trainable_percent",
                    "train_seconds", "peak_rss_gib", "sparsity_after_merge"):  # fmt: skip
            values = [run[key] for run in own if run.get(key) is not None]
            row[key] = sum(values) / len(values) if values else None
        row["tasks"] = {task: sum(run["tasks"][task] for run in own) / len(own) for task in own[0]["tasks"]}
        shares = [run["gap_recovered"] for run in own if run.get("gap_recovered") is not None]
        mean = sum(shares) / len(shares) if shares else 0.0
        row["gap_recovered_spread"] = (
            math.sqrt(sum((share - mean) ** 2 for share in shares) / (len(shares) - 1)) if len(shares) > 1 else None
        )
        summary[method] = row
    return summary


# ------------------------------------------------------------------------------------------------ the job


# Settings added after results.json files were written: left out of the key while unset, so that those files resume.
LATER_FIELDS = ("include_path",)


def _settings_key(settings: CompareSettings) -> dict[str, Any]:
    return {key: value for key, value in json.loads(json.dumps(asdict(settings))).items()
            if key not in PLAN_FIELDS and not (key in LATER_FIELDS and value is None)}  # fmt: skip


def _earlier(results_file: Path, settings: CompareSettings, resume: bool, log: Callable[[str], None]) -> dict[str, Any]:
    """The reference rows and runs of an earlier results.json measured with the same settings (resume only)."""
    if not resume or not results_file.is_file():
        return {"reference": {}, "runs": []}
    earlier = json.loads(results_file.read_text())
    if earlier.get("schema_version") != SCHEMA_VERSION or earlier.get("measured_with") != _settings_key(settings):
        log(f"{results_file} was measured with other settings: every run is redone")
        return {"reference": {}, "runs": []}
    return {"reference": earlier.get("reference", {}), "runs": earlier.get("runs", [])}


def _write(output: Path, settings: CompareSettings, report: dict[str, Any]) -> dict[str, Any]:
    report |= {"schema_version": SCHEMA_VERSION, "settings": json.loads(json.dumps(asdict(settings))),
               "measured_with": _settings_key(settings),
               "methods": summarise(report["runs"], settings.methods)}  # fmt: skip
    (output / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def compare(
    settings: CompareSettings,
    output: str | os.PathLike,
    *,
    resume: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Compare ``settings.methods`` over ``settings.seeds`` on one pruned model; write ``output/results.json`` after
    every run and return its content. With ``resume``, the runs of an earlier results.json measured with the same
    settings are kept (``skipped`` lists them) and no model is loaded when nothing is left to run."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    earlier = _earlier(output / "results.json", settings, resume, log)
    runs = [run for run in earlier["runs"] if run["method"] in settings.methods and run["seed"] in settings.seeds]
    done = {(run["method"], run["seed"]) for run in runs}
    plan = [(method, seed) for seed in settings.seeds for method in settings.methods]  # every method's first seed first
    todo = [key for key in plan if key not in done]
    report: dict[str, Any] = {"reference": earlier["reference"], "runs": runs, "skipped": sorted(done), "timings": {}}
    if not todo and {"dense", "pruned"} <= set(report["reference"]):
        log(f"every run is in {output / 'results.json'} already ({len(done)} skipped): nothing to train")
        return _write(output, settings, report)
    timer = recovery.StageTimer()
    models = _load_models(settings, timer)
    if not {"dense", "pruned"} <= set(report["reference"]):
        report["reference"] = _reference_rows(models, settings, timer)
        report["runs"] = runs = []  # runs measured against other reference rows cannot be paired with these
        todo = plan
    if any(method == "restorelcc" for method, _ in todo):
        with timer.stage("calibrate"):  # once, shared by every RestoreLCC run
            models.components = pipeline.calibrate_components(
                models.dense, models.pruned, models.tokenizer, models.report, settings.calibration_samples,
                settings.num_pairs,
            )  # fmt: skip
    report["pruning"] = pipeline.pruning_metadata(models.report)
    for method, seed in todo:
        log(f"training {method} seed {seed} ({settings.train_steps} steps)")
        runs.append(_with_recovery(_run(method, seed, models, settings, output / "work"), report["reference"]))
        report["timings"] = {"seconds": timer.seconds, "peak_rss_gib": timer.peak_rss_gib}
        _write(output, settings, report)
    return _write(output, settings, report)


# ------------------------------------------------------------------------------------------------ reporting


def _cell(value: float | None, form: str) -> str:
    return "" if value is None else format(value, form)


def compare_table(report: dict[str, Any]) -> str:
    """Markdown: dense, pruned and each method (mean over seeds): accuracy per task, mean, gap recovered, perplexity,
    trainable parameters, train seconds, peak memory, sparsity after merge."""
    reference = report["reference"]
    tasks = list(reference["dense"]["tasks"])
    lines = [
        "| model | " + " | ".join(tasks) + " | mean | gap recovered | perplexity | trainable | train s | peak GiB"
        " | sparsity after merge |",
        "|---|" + "---|" * (len(tasks) + 7),
    ]
    for name in ("dense", "pruned"):
        row = reference[name]
        cells = [f"{row['tasks'][task]:.3f}" for task in tasks]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {row['mean_accuracy']:.3f} | | "
                     f"{_cell(row['perplexity'], '.2f')} | 0 | | | {row['sparsity']:.4f} |")  # fmt: skip
    for name, row in report["methods"].items():
        cells = [f"{row['tasks'][task]:.3f}" for task in tasks]
        share = _cell(row["gap_recovered"], ".0%")
        if share and row["gap_recovered_spread"] is not None:
            share += f" ± {row['gap_recovered_spread']:.0%}"
        lines.append(
            f"| {name} | " + " | ".join(cells) + f" | {row['mean_accuracy']:.3f} | {share} | "
            f"{_cell(row['perplexity'], '.2f')} | {row['trainable_parameters']:,.0f} ({row['trainable_percent']:.2f}%)"
            f" | {_cell(row['train_seconds'], '.1f')} | {_cell(row['peak_rss_gib'], '.2f')} | "
            f"{_cell(row['sparsity_after_merge'], '.4f')} |"
        )
    lines.append("")
    lines.append("gap recovered: mean over seeds ± its spread between seeds (sample SD); peak GiB: resident, training")
    return "\n".join(lines)


def plot_compare(report: dict[str, Any], path: str | os.PathLike) -> Path | None:
    """Two panels: gap recovered per method (error bars: spread between seeds) and mean accuracy against trainable
    parameters. None where matplotlib is missing."""
    try:
        # Drawn on the Agg canvas directly: no pyplot, no GUI backend chosen, no environment variable set.
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    methods = report["methods"]
    figure = Figure(figsize=(10, 4))
    FigureCanvasAgg(figure)
    left, right = figure.subplots(1, 2)
    names = list(methods)
    shares = [methods[name]["gap_recovered"] or 0.0 for name in names]
    errors = [methods[name]["gap_recovered_spread"] or 0.0 for name in names]
    left.bar(names, shares, yerr=errors, capsize=4)
    left.set_ylabel("share of the dense-pruned gap recovered")
    for name in names:
        right.scatter(max(methods[name]["trainable_parameters"], 1), methods[name]["mean_accuracy"], label=name)
    for name, color in (("dense", "black"), ("pruned", "grey")):
        right.axhline(report["reference"][name]["mean_accuracy"], color=color, linestyle="--", linewidth=1, label=name)
    right.set_xscale("log")
    right.set_xlabel("trainable parameters")
    right.set_ylabel("mean accuracy")
    right.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return Path(path)
