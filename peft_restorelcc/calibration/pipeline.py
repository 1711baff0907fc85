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
    dense_model = None
    dense_owned = False
    store = None
    try:
        pruned_structure = structure_of(pruned_model, target_modules)
        head_dim = pruned_structure.head_dim
        pruned_projections = find_head_projections(unwrap(pruned_model), target_modules, head_dim)
        everything = (sequences or []) + (probe.prompts + probe.correct + probe.wrong if probe else [])
        check_tokens_fit(everything, pruned_structure.vocab_size, "pruned")
        if dense_declared is not None:  # all checks before any forward pass
            check_compatible(dense_declared, pruned_structure, kept_heads)
            check_tokens_fit(everything, dense_declared.vocab_size, "dense")
        fingerprint = model_fingerprint(pruned_model, target_modules=target_modules, head_dim=head_dim)
        metric = output_metric(pruned_model, pruned_projections)
        # A loader's name, else the loaded model's own path.
        pruned_name = model_name(pruned) or model_name(pruned_model)
        dense_name = model_name(dense)
        batches = make_batches(sequences, batch_size, pad_id, padding_side) if sequences else []
        num_heads = sum(pruned_structure.heads_per_layer)
        accumulator = LostAccumulator(position, num_heads, head_dim) if sequences else None

        capture = {
            "batch_size": batch_size,
            "pad_id": pad_id,
            "padding_side": padding_side,
            "target_modules": target_modules,
            "progress": progress,
        }

        def dense_side(model: nn.Module) -> tuple[list, torch.Tensor | None]:
            rows = dense_rows(model, pruned_structure, kept_heads, everything, target_modules)
            return find_head_projections(unwrap(model), target_modules, head_dim_of(model)), rows

        def pruned_probe_prompts(model: nn.Module) -> torch.Tensor | None:
            return capture_probe_prompts(model, probe, **capture) if probe else None

        pruned_iter = iterate_activations(pruned_model, pruned_projections, batches, position, "pruned model", progress)
        if isinstance(dense, nn.Module):
            # Both in memory: run them batch by batch side by side; nothing is stored.
            dense_model = dense
            dense_projections, rows = dense_side(dense_model)
            if accumulator is not None:
                accumulator.dense_rows = rows
                dense_iter = iterate_activations(
                    dense_model, dense_projections, batches, position, "dense model", progress
                )
                try:
                    for (_, pruned_acts), (_, dense_acts) in zip(pruned_iter, dense_iter):
                        accumulator.add(dense_acts, pruned_acts)
                finally:
                    # zip leaves the second generator suspended, its hooks still in place: close both.
                    pruned_iter.close()
                    dense_iter.close()
            pruned_prompt = pruned_probe_prompts(pruned_model)
        else:
            # One model at a time: keep the pruned activations (on disk for "all") until the dense model runs.
            store = ActivationStore(on_disk=position == "all", directory=spool_dir)
            for _, pruned_acts in pruned_iter:
                store.append(pruned_acts)
            pruned_prompt = pruned_probe_prompts(pruned_model)
            pruned_model = None
            release(pruned_owned)
            dense_model, dense_owned = obtain(dense)
            dense_projections, rows = dense_side(dense_model)
            if accumulator is not None:
                accumulator.dense_rows = rows
                dense_iter = iterate_activations(
                    dense_model, dense_projections, batches, position, "dense model", progress
                )
                for index, (_, dense_acts) in enumerate(dense_iter):
                    accumulator.add(dense_acts, store[index])
            store.close()
        dense_name = dense_name or model_name(dense_model)
        probe_result = None
        if probe is not None:
            probe_result = (pruned_prompt, *capture_probe_answers(dense_model, probe, rows, **capture))
        return _RunResult(accumulator, probe_result, pruned_structure, fingerprint, metric, dense_name, pruned_name)
    finally:
        if store is not None:
            store.close()
        pruned_model = dense_model = None
        release(pruned_owned or dense_owned)


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
