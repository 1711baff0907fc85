"""The restore pipeline, stage by stage.

load -> prune -> calibrate (lost components + head selection) -> build adapter -> train -> evaluate -> export.

Every stage takes models and data as arguments and returns what the next one needs; only :func:`load` reads a
model by name (through ``peft_restorelcc.io``: embedded name, local directory or Hub id). ``restorelcc run``
(``job.run_job``), ``calibrate`` and ``train``, ``compare``, ``benchmarks/recovery.py`` and
``benchmarks/task_specific.py`` all call these, so what the benchmarks measure is what users run.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..calibration import (
    CalibrationInputs,
    LostComponents,
    build_restorelcc_model,
    calibration_inputs,
    refine_lost_init,
)
from ..calibration import calibrate as run_calibration
from ..data import text_passages
from ..evaluation.tasks import evaluate_tasks, perplexity
from ..io import load_model, load_tokenizer, model_reference, name_model_source, resolve_model_path
from ..io.export import save_merged
from ..pruning import calibration_windows, prune_model
from ..training import build_train_dataset, train_adapter

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
