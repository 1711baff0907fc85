"""``restorelcc compare``: RestoreLCC against LoRA, DoRA and IA3 on one pruned model, same data, steps and seeds.

The dense model is loaded, pruned once (or the pruned model loaded), both evaluated once, the lost components
calibrated once (when RestoreLCC is compared), then every (method, seed) run builds its adapter with
``get_peft_model`` on a fresh copy of the pruned model, trains it on the same data for the same steps, is evaluated
on the same items, and is merged once to measure the sparsity that survives, its inference speed against the pruned
model and whether stock transformers reloads it (``merged_checks``). ``compare.json`` is written after every
run; a run that fails is recorded with its error and the next one goes on. With ``resume`` the finished runs it holds
under the same settings are kept, not redone; the failed ones are run again.

A method is a ``MethodSpec``: a kind (``BUILDERS``: restorelcc, lora, dora, ia3, every-weight) and its recipe (rate,
data, distillation weight, calibration, tasks, the kind's own keys). ``compare``'s methods are specs with the standard
recipes (``standard_spec``); benchmarks/recovery.py turns the rows of its table into specs and runs each through the
same ``run_method``, its own data sets and cached calibrations plugged in by subclassing ``Models``.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import pipeline
from ..evaluation import statistics as recovery
from ..io import model_reference, name_model_source, resolve_model_path
from ..io.adapters import record_base
from ..io.checks import write_json_atomic
from ..io.devices import default_device
from ..pruning import hold_pruned_weights_at_zero, load_report, measure_sparsity, save_pruned
from ..training import PaddingCollator, pad_token_id_of
from ..training.choices import DEFAULT_DATA
from .masked_lora import MaskedLoraConfig
from .merged_checks import merged_measures, unmerged_speed
from .settings import PLAN_FIELDS, READABLE_SCHEMAS, RESULTS_FILE, SCHEMA_VERSION, CompareSettings, parse_prune
from .table import summarise

__all__ = ["BUILDERS", "CALIBRATIONS", "MethodSpec", "Models", "compare", "run_method", "standard_spec"]

PRUNED_DIR = "pruned"  # the model pruned on the fly (--prune), the base the kept adapters name


@dataclass
class MethodSpec:
    """One method of a comparison: its kind (a key of ``BUILDERS``) and its recipe. The kind's own keys (heads,
    selection, init for restorelcc; rank, target_modules for lora and dora) are read by its builder only."""

    name: str
    kind: str
    learning_rate: float
    data: str = DEFAULT_DATA
    distill_alpha: float = 0.0  # weight of the KL to the dense model in the loss (0: the LM loss alone, no teacher)
    calibration: str = "general"  # whose lost components a RestoreLCC adapter is built from (Models.components_for)
    tasks: Sequence[str] | None = None  # the tasks the method is scored on (None: the comparison's)
    heads: float = 0.25
    selection: str = "top"
    init: str = "paper"
    rank: int = 8
    target_modules: str | Sequence[str] = "all-linear"

    def __post_init__(self) -> None:
        if self.kind not in BUILDERS:
            raise ValueError(f"method {self.name!r}: kind must be one of {sorted(BUILDERS)}, got {self.kind!r}")
        if not 0 <= self.distill_alpha <= 1 or self.learning_rate <= 0:
            raise ValueError(f"method {self.name!r}: distill_alpha must be in [0, 1] and learning_rate > 0")


def standard_spec(method: str, settings: CompareSettings) -> MethodSpec:
    """One of ``METHODS`` with the standard recipe, as ``settings`` sets it (rate, data, heads, LoRA rank)."""
    return MethodSpec(name=method, kind=method, learning_rate=settings.learning_rate(method), data=settings.data,
                      heads=settings.heads, rank=settings.lora_rank)  # fmt: skip


# ------------------------------------------------------------------------------------------------ the models


class Models:
    """What every run shares: the dense and pruned models, the tokenizer, the pruning report, the device, and the lost
    components of each calibration (measured once, on first use). The two hooks a benchmark may override:
    ``components_for`` (e.g. a cache on disk) and ``training_dataset`` (its own data sets)."""

    def __init__(self, dense: nn.Module, pruned: nn.Module, tokenizer: Any, report: dict[str, Any],
                 device: torch.device, settings: CompareSettings, timer: recovery.StageTimer | None = None):  # fmt: skip
        self.dense, self.pruned, self.tokenizer, self.report, self.device = dense, pruned, tokenizer, report, device
        self.settings, self.timer = settings, timer or recovery.StageTimer()
        self.components: dict[str, Any] = {}
        self.pruned_dir: Path | None = None  # the saved pruned model, when there is one: what adapters record

    def components_for(self, calibration: str) -> Any:
        """The ``LostComponents`` of a calibration of ``CALIBRATIONS``, measured once."""
        if calibration not in self.components:
            if calibration not in CALIBRATIONS:
                raise ValueError(f"calibration must be one of {sorted(CALIBRATIONS)}, got {calibration!r}")
            with self.timer.stage("calibrate" if calibration == "general" else f"calibrate {calibration}"):
                self.components[calibration] = CALIBRATIONS[calibration](self)
        return self.components[calibration]

    def training_dataset(self, data: str, samples: int, seed: int, seq_len: int = 128) -> Any:
        """Tokenized training sequences of ``data`` (``pipeline.training_data``), at most ``seq_len`` tokens each."""
        return pipeline.training_data(data, self.tokenizer, samples=samples, seed=seed, seq_len=seq_len)


def _general_calibration(models: Models) -> Any:
    settings = models.settings
    return pipeline.calibrate_components(models.dense, models.pruned, models.tokenizer, models.report,
                                         settings.calibration_samples, settings.num_pairs)  # fmt: skip


# How a spec's ``calibration`` is measured: ``general`` is what ``restorelcc run`` calibrates on.
CALIBRATIONS: dict[str, Callable[[Models], Any]] = {"general": _general_calibration}


def _load_models(settings: CompareSettings, timer: recovery.StageTimer, output: Path) -> Models:
    device = default_device(settings.device)
    dense_path = resolve_model_path(settings.model, settings.revision)
    pruned_path = None if settings.pruned is None else resolve_model_path(settings.pruned, settings.pruned_revision)
    if pruned_path is not None:
        _check_same_architecture(dense_path, pruned_path)  # before any weights load
    with timer.stage("load"):
        dense, tokenizer = pipeline.load(dense_path, dtype=settings.dtype, device=device)
    name_model_source(dense, model_reference(settings.model, dense_path))  # what a pruned copy records it came from
    if pruned_path is None:
        method, sparsity, pattern = parse_prune(settings.prune)
        with timer.stage("prune"):
            pruned, report = pipeline.prune(dense, tokenizer, method, sparsity, pattern, settings.prune_samples)
            _save_pruned_once(pruned, tokenizer, report, output / PRUNED_DIR)
    else:
        with timer.stage("load"):
            pruned, _ = pipeline.load(pruned_path, dtype=settings.dtype, device=device)
        name_model_source(pruned, model_reference(settings.pruned, pruned_path))
        report = load_report(pruned_path) if (pruned_path / "pruning_report.json").is_file() else {}
    models = Models(dense, pruned, tokenizer, report, device, settings, timer)
    models.pruned_dir = output / PRUNED_DIR if pruned_path is None else pruned_path  # what its adapters record
    return models


def _save_pruned_once(pruned: nn.Module, tokenizer: Any, report: dict[str, Any], directory: Path) -> None:
    """The model pruned on the fly, saved so that the adapters kept under work/ name a base a user can load. A copy
    from an earlier comparison with the same pruning (the same report, but for its timing) is kept; any other is
    replaced."""
    if (directory / "pruning_report.json").is_file():
        def timeless(entries: dict[str, Any]) -> str:
            return json.dumps({key: value for key, value in entries.items() if key != "seconds"}, default=str)

        if timeless(load_report(directory)) == timeless(json.loads(json.dumps(report, default=str))):
            pruned.config.pruned_from = pruned.name_or_path
            name_model_source(pruned, directory.resolve())
            return
    if directory.exists():
        shutil.rmtree(directory)
    save_pruned(pruned, tokenizer, directory, report)


# What a pruned copy shares with its dense model (pruning zeroes weights, it changes no shape).
SHAPE_KEYS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "vocab_size")  # fmt: skip


def _check_same_architecture(dense_path: Path, pruned_path: Path) -> None:
    from transformers import AutoConfig

    dense, pruned = (AutoConfig.from_pretrained(path).to_dict() for path in (dense_path, pruned_path))
    differ = [key for key in SHAPE_KEYS if dense.get(key) != pruned.get(key)]
    if differ:
        raise ValueError(f"--pruned is not a pruned copy of --model: their {', '.join(differ)} differ")


def _lora(model: nn.Module, spec: MethodSpec, dora: bool = False, masked: bool = False) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    target_modules = spec.target_modules if isinstance(spec.target_modules, str) else list(spec.target_modules)
    config_class = LoraConfig
    if masked:  # LoRA whose update is masked by the base weight's zeros (masked_lora): same modules, same rank
        config_class = MaskedLoraConfig
        if measure_sparsity(model)["overall_sparsity"] == 0:
            raise ValueError("masked-lora needs a pruned model: this one has no zero weight to keep")
    config = config_class(r=spec.rank, target_modules=target_modules, use_dora=dora, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def _ia3(model: nn.Module, spec: MethodSpec) -> nn.Module:
    from peft import IA3Config, get_peft_model

    return get_peft_model(model, IA3Config(task_type="CAUSAL_LM"))


def _restorelcc(model: nn.Module, spec: MethodSpec, models: Models) -> nn.Module:
    components = models.components_for(spec.calibration)
    return pipeline.build_adapter(model, components, spec.heads, init=spec.init, selection=spec.selection)


def _every_weight(model: nn.Module, spec: MethodSpec, models: Models) -> nn.Module:
    """Every weight trained, the pruned ones held at zero: not a PEFT method, the ceiling the others are held to."""
    model.requires_grad_(True)
    hold_pruned_weights_at_zero(model)
    return model


# A builder per method kind: (a fresh copy of the pruned model, the spec, the shared models) -> the model to train.
BUILDERS: dict[str, Callable[[nn.Module, MethodSpec, Models], nn.Module]] = {
    "restorelcc": _restorelcc,
    "lora": lambda model, spec, _: _lora(model, spec),
    "dora": lambda model, spec, _: _lora(model, spec, dora=True),
    "masked-lora": lambda model, spec, _: _lora(model, spec, masked=True),
    "ia3": lambda model, spec, _: _ia3(model, spec),
    "every-weight": _every_weight,
}


# ------------------------------------------------------------------------------------------------ measuring


def evaluate(
    model: nn.Module, models: Models, settings: CompareSettings, tasks: Sequence[str] | None = None
) -> dict[str, Any]:
    """Headline accuracy per task, mean, perplexity and each item's score (every model answers the same items), on
    ``tasks`` (None: the settings')."""
    tasks = tasks or settings.tasks
    results = pipeline.evaluate(
        model, models.tokenizer, tasks=list(tasks) if tasks else None, limit=settings.limit or None,
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


def _reference_rows(models: Models, settings: CompareSettings, timer: recovery.StageTimer) -> dict[str, Any]:
    total = sum(parameter.numel() for parameter in models.pruned.parameters())
    rows = {}
    for name, model in (("dense", models.dense), ("pruned", models.pruned)):
        with timer.stage(f"evaluate {name}"):
            rows[name] = evaluate(model, models, settings)
        rows[name] |= {"parameters": total, "sparsity": measure_sparsity(model)["overall_sparsity"]}
    return rows


# The training set's size when training by epochs without --train-samples (the paper's 2k examples).
EPOCH_SAMPLES = 2000


def _train_samples(settings: CompareSettings) -> int:
    """How many examples the training set holds: the same for every method and seed."""
    if settings.train_samples is not None:
        return settings.train_samples
    if settings.epochs is not None:
        return EPOCH_SAMPLES
    return settings.train_steps * settings.batch_size


def _train_length(settings: CompareSettings) -> dict[str, Any]:
    """``pipeline.train``'s keywords for how long to train: ``max_steps`` steps, or (max_steps -1, as
    ``restorelcc run --train-steps -1``) ``epochs`` passes over the training set."""
    if settings.epochs is not None:
        return {"max_steps": -1, "epochs": settings.epochs}
    return {"max_steps": settings.train_steps}


def _data_seen(metrics: dict[str, Any], dataset: Any, settings: CompareSettings) -> dict[str, Any]:
    """What a reader checks every method saw alike: epochs over how many examples of which length, and the number
    of examples the optimizer steps went through."""
    steps, batch = metrics.get("steps"), metrics.get("global_batch_size")
    return {
        "epochs": metrics.get("epochs"), "seq_len": settings.seq_len, "global_batch_size": batch,
        "examples_seen": None if steps is None or not batch else examples_seen(steps, len(dataset), batch),
    }  # fmt: skip


def examples_seen(steps: int, examples: int, batch: int) -> int:
    """Examples that ``steps`` optimizer steps of ``batch`` go through on a training set of ``examples``: the
    Trainer's epochs are ceil(examples / batch) steps, the last batch of an epoch short."""
    per_epoch = math.ceil(examples / batch)
    epochs, rest = divmod(steps, per_epoch)
    return epochs * examples + min(rest * batch, examples)


def run_method(spec: MethodSpec, seed: int, models: Models, settings: CompareSettings, work: Path) -> dict[str, Any]:
    """One seed of one method: build, train, evaluate, merge once and measure the merged model; what compare.json
    keeps of it."""
    timer = recovery.StageTimer()
    torch.manual_seed(seed)
    model = BUILDERS[spec.kind](copy.deepcopy(models.pruned), spec, models)
    record_base(model, models.pruned.name_or_path, settings.pruned_revision if settings.pruned else None,
                local_dir=models.pruned_dir)  # fmt: skip
    teacher = models.dense if spec.distill_alpha > 0 else None
    dataset = models.training_dataset(spec.data, samples=_train_samples(settings), seed=seed, seq_len=settings.seq_len)
    first_batch = [dataset[i] for i in range(min(settings.batch_size, len(dataset)))]
    memory = recovery.training_memory_bytes(model, PaddingCollator(pad_token_id_of(models.tokenizer))(first_batch))
    with timer.stage("train"):
        metrics = pipeline.train(
            model, models.tokenizer, dataset, work / f"{spec.name}-seed{seed}", learning_rate=spec.learning_rate,
            batch_size=settings.batch_size, seed=seed, save_steps=10**9, logging_steps=10, device=models.device,
            teacher=teacher, distill_alpha=spec.distill_alpha if teacher is not None else 1.0,
            **_train_length(settings),
        )  # fmt: skip
    trainable = recovery.trainable_parameters(model)
    with timer.stage("evaluate"):
        measured = evaluate(model, models, settings, spec.tasks)
    with timer.stage("unmerged speed"):  # before the merge: base plus adapter, as PEFT serves it unmerged
        unmerged = unmerged_speed(models.pruned, model)
    with timer.stage("merge"):  # once, in place: the trained adapter is not used after this
        merged = merged_measures(model, models.pruned, models.tokenizer, work / f"{spec.name}-seed{seed}",
                                 restorelcc=spec.kind == "restorelcc")  # fmt: skip
    total = sum(parameter.numel() for parameter in models.pruned.parameters())
    return {
        "method": spec.name, "seed": seed, **measured, "trainable_parameters": trainable,
        "trainable_percent": 100.0 * trainable / total, **unmerged, **merged, **_data_seen(metrics, dataset, settings),
        "train_seconds": metrics.get("seconds", timer.seconds["train"]), "train_steps": metrics.get("steps"),
        "seconds_per_step": metrics.get("seconds_per_step"), "train_examples": len(dataset),
        "train_memory_mb": memory / 2**20, "data": spec.data, "learning_rate": spec.learning_rate,
        "distill_alpha": spec.distill_alpha if teacher is not None else None,
        "peak_rss_gib": timer.peak_rss_gib.get("train"), "peak_gpu_gib": timer.peak_gpu_gib.get("train"),
        "peak_cuda_mb": metrics.get("peak_cuda_mb"), "stage_seconds": timer.seconds,
    }  # fmt: skip


def _with_recovery(run: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
    """The run with its share of the dense-pruned gap recovered and that share's paired standard error."""
    dense, pruned = reference["dense"], reference["pruned"]
    share = recovery.gap_recovered(dense["mean_accuracy"], pruned["mean_accuracy"], run["mean_accuracy"])
    items = [{task: recovery.item_scores(scores) for task, scores in row["items"].items()}
             for row in (dense, pruned, run)]  # fmt: skip
    return run | {"gap_recovered": share, "gap_recovered_stderr": recovery.gap_recovered_stderr(*items)}


# ------------------------------------------------------------------------------------------------ the job


def _settings_key(settings: CompareSettings) -> dict[str, Any]:
    return {key: value for key, value in json.loads(json.dumps(asdict(settings))).items() if key not in PLAN_FIELDS}


def _earlier(results_file: Path, settings: CompareSettings, resume: bool, log: Callable[[str], None]) -> dict[str, Any]:
    """The reference rows and finished runs of an earlier compare.json measured with the same settings (resume
    only); its failed runs are not kept: they are run again."""
    if not resume or not results_file.is_file():
        return {"reference": {}, "runs": []}
    earlier = json.loads(results_file.read_text())
    if earlier.get("schema_version") not in READABLE_SCHEMAS or earlier.get("measured_with") != _settings_key(settings):
        log(f"{results_file} was measured with other settings: every run is redone")
        return {"reference": {}, "runs": []}
    return {"reference": earlier.get("reference", {}), "runs": earlier.get("runs", [])}


def _write(output: Path, settings: CompareSettings, report: dict[str, Any]) -> dict[str, Any]:
    report |= {"schema_version": SCHEMA_VERSION, "settings": json.loads(json.dumps(asdict(settings))),
               "measured_with": _settings_key(settings),
               "methods": summarise(report["runs"], settings.methods)}  # fmt: skip
    write_json_atomic(output / RESULTS_FILE, report)  # a full disk or a kill never leaves half a file
    return report


def compare(
    settings: CompareSettings,
    output: str | os.PathLike,
    *,
    resume: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Compare ``settings.methods`` over ``settings.seeds`` on one pruned model; write ``output/compare.json`` after
    every run and return its content. A run that raises is recorded under ``failed`` (method, seed, error type and
    message) and the comparison goes on. With ``resume``, the finished runs of an earlier compare.json measured with
    the same settings are kept (``skipped`` lists them), its failed runs are run again, and no model is loaded when
    nothing is left to run."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    earlier = _earlier(output / RESULTS_FILE, settings, resume, log)
    runs = [run for run in earlier["runs"] if run["method"] in settings.methods and run["seed"] in settings.seeds]
    done = {(run["method"], run["seed"]) for run in runs}
    plan = [(method, seed) for seed in settings.seeds for method in settings.methods]  # every method's first seed first
    todo = [key for key in plan if key not in done]
    report: dict[str, Any] = {"reference": earlier["reference"], "runs": runs, "failed": [], "skipped": sorted(done),
                              "timings": {}}  # fmt: skip
    unmeasured = [run for run in runs if "unmerged_speed_ratio" not in run]  # kept from an earlier schema
    if not todo and not unmeasured and {"dense", "pruned"} <= set(report["reference"]):
        log(f"every run is in {output / RESULTS_FILE} already ({len(done)} skipped): nothing to train")
        return _write(output, settings, report)
    timer = recovery.StageTimer()
    models = _load_models(settings, timer, output)
    if not {"dense", "pruned"} <= set(report["reference"]):
        report["reference"] = _reference_rows(models, settings, timer)
        report["runs"] = runs = []  # runs measured against other reference rows cannot be paired with these
        todo = plan
    specs = {method: standard_spec(method, settings) for method in settings.methods}
    if any(specs[method].kind == "restorelcc" for method, _ in todo):
        models.components_for("general")  # once, shared by every RestoreLCC run
    report["pruning"] = pipeline.pruning_metadata(models.report)
    for run in (run for run in runs if "unmerged_speed_ratio" not in run):
        _fill_unmerged_speed(run, specs[run["method"]], models, log)
        _write(output, settings, report)
    for method, seed in _progress(todo):
        log(f"training {method} seed {seed} ({_length_text(settings)})")
        _attempt(specs[method], seed, models, settings, output, report, log)
        report["timings"] = {"seconds": timer.seconds, "peak_rss_gib": timer.peak_rss_gib}
        _write(output, settings, report)
    _log_failures(report, log)
    return _write(output, settings, report)


# How a kept run of an earlier schema got its unmerged speed (compare.json's unmerged_speed_source).
UNTRAINED_SOURCE = "untrained adapter of the same shape (run resumed from an earlier schema)"


def _fill_unmerged_speed(run: dict[str, Any], spec: MethodSpec, models: Models, log: Callable[[str], None]) -> None:
    """The unmerged forward time of a kept run that an earlier schema did not measure: it depends on the adapter's
    shape (method, modules, rank, heads), not on its trained values, so it is timed on a freshly built, untrained
    adapter of the same spec, and ``unmerged_speed_source`` says so."""
    log(f"timing {spec.name} seed {run['seed']} unmerged on an untrained adapter of the same shape (kept from an "
        "earlier schema)")  # fmt: skip
    torch.manual_seed(run["seed"])
    model = BUILDERS[spec.kind](copy.deepcopy(models.pruned), spec, models)
    run |= unmerged_speed(models.pruned, model) | {"unmerged_speed_source": UNTRAINED_SOURCE}
    del model
    _free_memory()


def _progress(todo: list[tuple[str, int]]) -> Any:
    """A progress bar over the runs (method x seed) still to do, on stderr."""
    from tqdm.auto import tqdm

    return tqdm(todo, desc="compare", unit="run", dynamic_ncols=True)


def _length_text(settings: CompareSettings) -> str:
    if settings.epochs is not None:
        return f"{settings.epochs:g} epochs over {_train_samples(settings)} examples"
    return f"{settings.train_steps} steps"


def _attempt(
    spec: MethodSpec, seed: int, models: Models, settings: CompareSettings, output: Path, report: dict[str, Any],
    log: Callable[[str], None],
) -> None:  # fmt: skip
    """One run, appended to ``report["runs"]``; an exception (build, train, evaluate, merge) is appended to
    ``report["failed"]`` with its type and message instead, and the comparison goes on."""
    method = spec.name
    try:
        run = run_method(spec, seed, models, settings, output / "work")
        report["runs"].append(_with_recovery(run, report["reference"]))
    except Exception as error:  # noqa: BLE001 - one failed run must not lose the others
        failure = {"method": method, "seed": seed, "error": {"type": type(error).__name__, "message": str(error)}}
        report["failed"].append(failure)
        log(f"{method} seed {seed} failed: {type(error).__name__}: {error}")
    else:
        return
    _free_memory()  # out of the except block: the exception's traceback, which holds the run's models, is gone


def _free_memory() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _log_failures(report: dict[str, Any], log: Callable[[str], None]) -> None:
    if report["failed"]:
        names = ", ".join(f"{failure['method']} seed {failure['seed']}" for failure in report["failed"])
        log(f"{len(report['failed'])} run(s) failed: {names} (errors in {RESULTS_FILE}; --resume runs them again)")


# ------------------------------------------------------------------------------------------------ reporting


