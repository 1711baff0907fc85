"""Calibration end to end: both models over the same prompts, lost components, head scores.

Each model is loaded (when given as a loader) and run once, for everything it has to compute: the pruned model
first (calibration prompts, probe prompts, its fingerprint and output-projection metric), then the dense model
(calibration prompts, which complete the lost activations batch by batch, and the probe's answers). Two models
already in memory are run batch by batch side by side instead, which needs no activation store at all.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..tuner.heads import find_head_projections, head_dim_of
from .capture import (
    POSITIONS,
    ActivationStore,
    LostAccumulator,
    ModelSource,
    ModelStructure,
    ProbeInputs,
    capture_probe_answers,
    capture_probe_prompts,
    check_compatible,
    check_same_tokenizer,
    check_tokens_fit,
    dense_rows,
    iterate_activations,
    make_batches,
    model_name,
    obtain,
    output_metric,
    pad_id_of,
    probe_inputs,
    release,
    structure_of,
    structure_of_config,
    tokenize,
    unwrap,
)
from .components import LostComponents, model_fingerprint, normalize_kept_heads
from .scoring import STRATEGIES, score_heads, score_with_probe


def _declared_structure(source: ModelSource) -> ModelStructure | None:
    """The dense model's structure without loading it: from the module, or from a loader's ``config``."""
    if isinstance(source, nn.Module):
        return structure_of(source)
    config = getattr(source, "config", None)
    return structure_of_config(config) if config is not None else None


@dataclass
class _RunResult:
    accumulator: LostAccumulator | None
    probe: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None
    pruned_structure: ModelStructure
    fingerprint: dict
    metric: torch.Tensor | None
    dense_name: str | None
    pruned_name: str | None


@dataclass
class _Pass:
    """What both ways of running the two models share: the batches, the accumulator and how to capture."""

    pruned_structure: ModelStructure
    pruned_projections: list
    everything: list[list[int]]  # every sequence either model reads (calibration and probe)
    batches: list
    accumulator: LostAccumulator | None
    capture: dict[str, Any]
    kept_heads: dict[int, list[int]] | None
    position: str

    def dense_side(self, model: nn.Module) -> tuple[list, torch.Tensor | None]:
        """The dense model's projections and the rows of its heads that the pruned heads came from."""
        target_modules = self.capture["target_modules"]
        rows = dense_rows(model, self.pruned_structure, self.kept_heads, self.everything, target_modules)
        return find_head_projections(unwrap(model), target_modules, head_dim_of(model)), rows

    def activations(self, model: nn.Module, projections: list, label: str) -> Any:
        return iterate_activations(model, projections, self.batches, self.position, label, self.capture["progress"])

    def probe_prompts(self, model: nn.Module, probe: ProbeInputs | None) -> torch.Tensor | None:
        return capture_probe_prompts(model, probe, **self.capture) if probe else None

    def probe_answers(self, model: nn.Module, probe: ProbeInputs, rows: torch.Tensor | None) -> tuple:
        return capture_probe_answers(model, probe, rows, **self.capture)


def _side_by_side(
    dense_model: nn.Module, pruned_model: nn.Module, probe: ProbeInputs | None, run: _Pass
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Both models in memory: run them batch by batch side by side; nothing is stored. Returns (dense rows, the
    pruned model's probe prompts)."""
    dense_projections, rows = run.dense_side(dense_model)
    if run.accumulator is not None:
        run.accumulator.dense_rows = rows
        pruned_iter = run.activations(pruned_model, run.pruned_projections, "pruned model")
        dense_iter = run.activations(dense_model, dense_projections, "dense model")
        try:
            for (_, pruned_acts), (_, dense_acts) in zip(pruned_iter, dense_iter):
                run.accumulator.add(dense_acts, pruned_acts)
        finally:
            # zip leaves the second generator suspended, its hooks still in place: close both.
            pruned_iter.close()
            dense_iter.close()
    return rows, run.probe_prompts(pruned_model, probe)


def _pruned_first(pruned_model: nn.Module, store: ActivationStore, probe: ProbeInputs | None, run: _Pass) -> Any:
    """One model at a time, the pruned one first: its activations go to ``store`` (on disk for "all") until the
    dense model runs. Returns the pruned model's probe prompts."""
    for _, pruned_acts in run.activations(pruned_model, run.pruned_projections, "pruned model"):
        store.append(pruned_acts)
    return run.probe_prompts(pruned_model, probe)


def _dense_after(dense_model: nn.Module, store: ActivationStore, run: _Pass) -> torch.Tensor | None:
    """The dense model, after the pruned one: completes the lost activations from ``store``. Returns its rows."""
    dense_projections, rows = run.dense_side(dense_model)
    if run.accumulator is not None:
        run.accumulator.dense_rows = rows
        for index, (_, dense_acts) in enumerate(run.activations(dense_model, dense_projections, "dense model")):
            run.accumulator.add(dense_acts, store[index])
    store.close()
    return rows


def _check_before_running(
    everything: list[list[int]],
    pruned_structure: ModelStructure,
    dense_declared: ModelStructure | None,
    kept_heads: dict[int, list[int]] | None,
) -> None:
    """Every check that needs no forward pass: token ids in both vocabularies, the two structures compatible."""
    check_tokens_fit(everything, pruned_structure.vocab_size, "pruned")
    if dense_declared is not None:
        check_compatible(dense_declared, pruned_structure, kept_heads)
        check_tokens_fit(everything, dense_declared.vocab_size, "dense")


def _run_models(
    dense: ModelSource,
    pruned: ModelSource,
    sequences: list[list[int]] | None,
    probe: ProbeInputs | None,
    *,
    position: str,
    kept_heads: dict[int, list[int]] | None,
    batch_size: int,
    pad_id: int,
    padding_side: str,
    target_modules: str | list[str] | None,
    spool_dir: str | None,
    progress: bool,
) -> _RunResult:
    dense_declared = _declared_structure(dense)
    pruned_model, pruned_owned = obtain(pruned)
    dense_model, dense_owned, store = None, False, None
    try:
        pruned_structure = structure_of(pruned_model, target_modules)
        head_dim = pruned_structure.head_dim
        pruned_projections = find_head_projections(unwrap(pruned_model), target_modules, head_dim)
        everything = (sequences or []) + (probe.prompts + probe.correct + probe.wrong if probe else [])
        _check_before_running(everything, pruned_structure, dense_declared, kept_heads)
        fingerprint = model_fingerprint(pruned_model, target_modules=target_modules, head_dim=head_dim)
        metric = output_metric(pruned_model, pruned_projections)
        # A loader's name, else the loaded model's own path.
        pruned_name = model_name(pruned) or model_name(pruned_model)
        dense_name = model_name(dense)
        run = _Pass(
            pruned_structure,
            pruned_projections,
            everything,
            make_batches(sequences, batch_size, pad_id, padding_side) if sequences else [],
            LostAccumulator(position, sum(pruned_structure.heads_per_layer), head_dim) if sequences else None,
            {"batch_size": batch_size, "pad_id": pad_id, "padding_side": padding_side,
             "target_modules": target_modules, "progress": progress},
            kept_heads,
            position,
        )  # fmt: skip
        if isinstance(dense, nn.Module):
            dense_model = dense
            rows, pruned_prompt = _side_by_side(dense_model, pruned_model, probe, run)
        else:
            store = ActivationStore(on_disk=position == "all", directory=spool_dir)
            pruned_prompt = _pruned_first(pruned_model, store, probe, run)
            pruned_model = None  # this frame's reference too, so that release() frees the pruned model
            release(pruned_owned)
            dense_model, dense_owned = obtain(dense)
            rows = _dense_after(dense_model, store, run)
        dense_name = dense_name or model_name(dense_model)
        probe_result = None if probe is None else (pruned_prompt, *run.probe_answers(dense_model, probe, rows))
        return _RunResult(run.accumulator, probe_result, pruned_structure, fingerprint, metric, dense_name,
                          pruned_name)  # fmt: skip
    finally:
        if store is not None:
            store.close()
        pruned_model = dense_model = None
        release(pruned_owned or dense_owned)


# Long on purpose, for now: it checks and normalises the documented options before handing them to _run_models
# and the scoring; an options object would change the signature the README documents.
def calibrate(
    dense: ModelSource,
    pruned: ModelSource,
    prompts: Sequence[str] | Sequence[Sequence[int]] | torch.Tensor,
    tokenizer: Any = None,
    *,
    pairs: Sequence[dict[str, str]] | None = None,
    strategy: str | None = "probe",
    position: str = "last",
    kept_heads: dict[int, list[int]] | None = None,
    batch_size: int = 8,
    max_length: int | None = 512,
    padding_side: str | None = None,
    target_modules: str | list[str] | None = None,
    pruning: dict[str, Any] | None = None,
    dense_name: str | None = None,
    pruned_name: str | None = None,
    pruned_tokenizer: Any = None,
    seed: int = 0,
    lost_norm_reduction: str = "mean",
    spool_dir: str | None = None,
    progress: bool = True,
) -> LostComponents:
    """Measure what pruning took from every head of ``pruned`` and (unless ``strategy=None``) score the heads.

    ``dense`` / ``pruned``: models, or callables that load them (e.g. :class:`ModelLoader`), loaded one at a
    time and freed after use. ``prompts``: texts (with ``tokenizer``) or token id lists. ``position``:
    ``"last"`` prompt token (paper) or ``"all"`` non-padding tokens (memory independent of their number).
    ``kept_heads``: ``{layer: [dense head indices]}`` for structurally pruned models. ``pairs``:
    ``[{"prompt", "correct", "wrong"}]`` for ``strategy="probe"``. ``pruning``: a description of the pruning
    (e.g. the pruning report's method and sparsity) stored with the results.
    """
    if position not in POSITIONS:
        raise ValueError(f"position must be one of {POSITIONS}, got {position!r}.")
    if strategy is not None and strategy not in STRATEGIES:
        raise ValueError(f"Unknown scoring strategy {strategy!r}; choose one of {STRATEGIES} or None.")
    if strategy == "probe" and not pairs:
        raise ValueError(
            "strategy='probe' needs contrastive pairs=[{'prompt', 'correct', 'wrong'}, ...] "
            "(or choose strategy='lost_norm' / 'random')."
        )
    kept_heads = normalize_kept_heads(kept_heads)
    check_same_tokenizer(tokenizer, pruned_tokenizer)
    sequences = tokenize(prompts, tokenizer, max_length)
    probe = probe_inputs(pairs, tokenizer, max_length) if strategy == "probe" else None
    if padding_side is None:
        padding_side = getattr(tokenizer, "padding_side", None) or "right"
    result = _run_models(
        dense,
        pruned,
        sequences,
        probe,
        position=position,
        kept_heads=kept_heads,
        batch_size=batch_size,
        pad_id=pad_id_of(tokenizer),
        padding_side=padding_side,
        target_modules=target_modules,
        spool_dir=spool_dir,
        progress=progress,
    )
    basis, singular_values, mean = result.accumulator.finish()
    structure = result.pruned_structure
    components = LostComponents(
        layer_indices=list(structure.layer_indices),
        heads_per_layer=list(structure.heads_per_layer),
        head_dim=structure.head_dim,
        basis=basis,
        singular_values=singular_values,
        mean=mean,
        output_metric=result.metric,
        metadata={
            "dense_model": dense_name or result.dense_name,
            "pruned_model": pruned_name or result.pruned_name,
            "pruning": pruning,
            "num_samples": len(sequences),
            "num_positions": result.accumulator.count,
            "position": position,
            "max_length": max_length,
            "kept_heads": kept_heads,
            "target_modules": target_modules,
            "module_names": list(structure.module_names),
            "fingerprint": result.fingerprint,
        },
    )
    if strategy == "probe":
        return score_with_probe(components, *result.probe, seed=seed)
    if strategy is not None:
        return score_heads(components, strategy, seed=seed, reduction=lost_norm_reduction)
    return components
