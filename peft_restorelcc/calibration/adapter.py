"""From calibration to an adapter: choose the heads, wrap the pruned model, fill the bases (and magnitudes)."""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..tuner import RestoreLCCConfig, restorelcc_layers
from ..tuner.heads import find_head_projections
from .capture import (
    ModelStructure,
    dense_index,
    iterate_activations,
    make_batches,
    obtain,
    pad_id_of,
    release,
    structure_of,
    tokenize,
    unwrap,
)
from .components import LostComponents, normalize_kept_heads

if TYPE_CHECKING:
    from peft import PeftModel

INITS = ("paper", "lost")
# How the top heads are taken from the ranking: "top" (the paper) takes the best-scored heads wherever they lie;
# "per-layer" takes every layer's best head, then every layer's second best, and so on (a round not taken whole goes
# to the better-scored heads). On SmolLM2-135M the probe's top heads cluster in a few layers; spread over the layers
# they recovered more perplexity under distillation but no more accuracy on the paper's recipe (README, "Recovery
# against LoRA"), so "top" stays the default.
SELECTIONS = ("top", "per-layer")


def resolve_head_count(num_heads: int | float, total: int) -> int:
    """A head count from ``num_heads``: an int (or a whole float >= 1) is a count, a float in (0, 1) a fraction."""
    if isinstance(num_heads, bool) or not isinstance(num_heads, numbers.Real):
        raise ValueError(f"num_heads must be a count or a fraction of the heads, got {num_heads!r}.")
    if isinstance(num_heads, numbers.Integral) or (float(num_heads) >= 1 and float(num_heads).is_integer()):
        count = int(num_heads)
    elif 0 < float(num_heads) < 1:
        count = max(1, round(float(num_heads) * total))
    else:
        raise ValueError(f"num_heads={num_heads!r}: give a count (1..{total}) or a fraction of all heads in (0, 1).")
    if not 1 <= count <= total:
        raise ValueError(f"num_heads={num_heads!r}: the pruned model has {total} heads; choose 1..{total}.")
    return count


def select_heads(components: LostComponents, num_heads: int | float, selection: str = "top") -> dict[int, list[int]]:
    """``num_heads`` heads by score, as ``{layer: [sorted head indices]}`` (pruned-model numbering).

    ``selection="top"``: the best-scored heads over the whole model. ``"per-layer"``: every layer's best head, then
    every layer's second best, ... ; within a round the better-scored heads first.
    """
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}.")
    count = resolve_head_count(num_heads, components.num_heads)
    ranking = components.ranking()
    head_ids = components.head_ids()
    if selection == "per-layer":
        ranking = spread_over_layers(ranking, torch.tensor([layer for layer, _ in head_ids]))
    selected: dict[int, list[int]] = {}
    for row in ranking[:count].tolist():
        layer, head = head_ids[row]
        selected.setdefault(layer, []).append(head)
    return {layer: sorted(heads) for layer, heads in sorted(selected.items())}


def spread_over_layers(ranking: torch.Tensor, layer_of_row: torch.Tensor) -> torch.Tensor:
    """``ranking`` (row indices, best first) reordered round by round: each layer's best row, then each layer's
    second best, ...; rows of one round keep their order in ``ranking``."""
    layers = layer_of_row[ranking]
    _, layer_slot = layers.unique(return_inverse=True)
    # Rank of each row within its layer: how many rows of the same layer come before it in the ranking.
    seen = torch.nn.functional.one_hot(layer_slot).cumsum(0)
    rank_in_layer = seen.gather(1, layer_slot[:, None]).squeeze(1) - 1
    return ranking[torch.argsort(rank_in_layer, stable=True)]


def _fill_from_components(
    peft_model: PeftModel, components: LostComponents, k: int, init: str, adapter_name: str
) -> dict[int, list[int]]:
    """Copy each wrapped head's basis (and, for ``init="lost"``, its magnitudes) from ``components``; returns the
    heads filled, per layer."""
    basis = components.basis[:, :k]
    coefficients = components.lost_coefficients(k)
    filled: dict[int, list[int]] = {}
    with torch.no_grad():
        for layer in restorelcc_layers(peft_model):
            if adapter_name not in layer.head_indices:
                continue
            head_indices = layer.head_indices[adapter_name]
            rows = components.rows_of(layer.layer_index, head_indices)
            target = layer.restorelcc_basis[adapter_name]
            target.copy_(basis[rows].to(device=target.device, dtype=target.dtype))
            if init == "lost":
                magnitude = layer.restorelcc_magnitude[adapter_name]
                magnitude.copy_(coefficients[rows].to(device=magnitude.device, dtype=magnitude.dtype))
                if adapter_name in layer.restorelcc_bias:
                    layer.restorelcc_bias[adapter_name].zero_()
            filled[layer.layer_index] = sorted(head_indices)
    return filled


def build_restorelcc_model(
    pruned_model: nn.Module,
    components: LostComponents,
    num_heads: int | float,
    init: str = "paper",
    num_components: int | None = None,
    adapter_name: str = "default",
    selection: str = "top",
    **config_kwargs: Any,
) -> PeftModel:
    """Wrap ``pruned_model`` with a RestoreLCC adapter on ``num_heads`` heads chosen by ``selection`` (see
    :func:`select_heads`), bases filled from ``components`` (their first ``num_components`` rows; default all).

    ``init="paper"`` keeps the N(0, init_std) initialisation of magnitudes and bias; ``init="lost"`` sets the
    magnitudes to the coefficients of the mean lost vector in the basis and the bias to zero, so the adapter adds
    back the (projected) mean loss before any training. Extra keyword arguments go to ``RestoreLCCConfig``.
    Returns the ``PeftModel``.
    """
    # Imported here: the tuner registers itself with PEFT on import, and calibration alone does not need it.
    from peft import get_peft_model

    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}.")
    d = components.head_dim
    k = d if num_components is None else int(num_components)
    if not 1 <= k <= d:
        raise ValueError(f"num_components={num_components!r} must be in 1..{d} (head_dim).")
    if init == "lost" and not config_kwargs.get("use_components", True):
        raise ValueError("init='lost' sets the magnitudes; it needs use_components=True.")
    components.check_matches(pruned_model)
    heads = select_heads(components, num_heads, selection)
    target_modules = components.metadata.get("target_modules")
    if target_modules is not None:
        config_kwargs.setdefault("target_modules", target_modules)
    config_kwargs.setdefault("task_type", "CAUSAL_LM")
    # The paper's N(0, init_std), asked for by name since init_weights=True became PEFT's identity init. Also for
    # init="lost", which overwrites the values: the same random draws keep seeded runs where they were.
    config_kwargs.setdefault("init_weights", "gaussian")
    config = RestoreLCCConfig(heads=heads, num_components=k, head_dim=d, **config_kwargs)
    peft_model = get_peft_model(pruned_model, config, adapter_name=adapter_name)

    filled = _fill_from_components(peft_model, components, k, init, adapter_name)
    if filled != heads:
        raise ValueError(
            f"The adapter wrapped heads {filled} but {heads} were selected: the components' layers do not match "
            "this model's attention projections."
        )
    return peft_model


def _dense_head_means(
    dense: Any,
    components: LostComponents,
    batches: list,
    position: str,
    target_modules: Any,
    progress: bool,
) -> torch.Tensor:
    """The mean dense activation of every pruned head's dense counterpart, rows as in ``components``."""
    pruned_structure = ModelStructure(
        num_hidden_layers=None,
        layer_indices=tuple(components.layer_indices),
        heads_per_layer=tuple(components.heads_per_layer),
        head_dim=components.head_dim,
        vocab_size=None,
    )

    dense_model, owned = obtain(dense)
    try:
        dense_structure = structure_of(dense_model, target_modules)
        rows = dense_index(
            dense_structure, pruned_structure, normalize_kept_heads(components.metadata.get("kept_heads"))
        )
        projections = find_head_projections(unwrap(dense_model), target_modules, components.head_dim)
        total, count = torch.zeros(len(rows), components.head_dim, dtype=torch.float64), 0
        for _, acts in iterate_activations(dense_model, projections, batches, position, "dense model", progress):
            total += acts[:, rows].sum(0, dtype=torch.float64)
            count += acts.shape[0]
        dense_mean = total / count
    finally:
        dense_model = None
        release(owned)
    return dense_mean


def _refine_layers(
    peft_model: nn.Module,
    layers: list,
    components: LostComponents,
    dense_mean: torch.Tensor,
    batches: list,
    position: str,
    target_modules: Any,
    progress: bool,
    adapter_name: str,
) -> dict[int, float]:
    """Set each layer's magnitudes, in order, to the mean loss left with the layers below compensated."""
    pruned_projections = {
        p.layer_index: p for p in find_head_projections(unwrap(peft_model), target_modules, components.head_dim)
    }
    remaining: dict[int, float] = {}
    with torch.no_grad():
        for layer in layers:
            projection = pruned_projections[layer.layer_index]
            total, count = torch.zeros(projection.num_heads, components.head_dim, dtype=torch.float64), 0
            for _, acts in iterate_activations(
                peft_model, [projection], batches, position, f"layer {layer.layer_index}", progress, stop_early=True
            ):
                total += acts.sum(0, dtype=torch.float64)
                count += acts.shape[0]
            heads = layer.head_indices[adapter_name]
            layer_rows = components.rows_of(layer.layer_index, heads)
            lost = (dense_mean[layer_rows] - (total / count)[heads]).float()
            remaining[layer.layer_index] = float(lost.norm())
            basis = layer.restorelcc_basis[adapter_name]
            magnitude = layer.restorelcc_magnitude[adapter_name]
            coefficients = torch.einsum("hkd,hd->hk", basis.float().cpu(), lost)
            magnitude.copy_(coefficients.to(device=magnitude.device, dtype=magnitude.dtype))
            if adapter_name in layer.restorelcc_bias:
                layer.restorelcc_bias[adapter_name].zero_()
    return remaining


def refine_lost_init(
    peft_model: nn.Module,
    dense: Any,
    prompts: Sequence[str] | Sequence[Sequence[int]] | torch.Tensor,
    tokenizer: Any = None,
    *,
    components: LostComponents,
    adapter_name: str = "default",
    batch_size: int = 8,
    max_length: int | None = None,
    padding_side: str | None = None,
    progress: bool = True,
) -> dict[int, float]:
    """Re-measure the "lost" init layer by layer, each layer with the compensation of the layers below in place.

    Independently measured losses do not add up: compensating layer 0 changes what every later layer receives, so
    its measured loss is stale (compensating many heads that way was seen to make a pruned model worse). Here the
    mean dense head activations are taken once; then for each compensated layer, in order, the wrapped pruned model
    runs up to that layer only (with the already refined layers below), and the layer's magnitudes become the
    coefficients of the remaining mean loss in its basis (bias zero). The cost is about half a forward pass of the
    pruned model per compensated layer. Returns, per layer, the norm of the mean loss that was left after the
    layers below had been compensated (summed over its compensated heads).
    """
    position = components.metadata.get("position") or "last"
    if max_length is None:
        max_length = components.metadata.get("max_length", 512)
    if padding_side is None:
        padding_side = getattr(tokenizer, "padding_side", None) or "right"
    batches = make_batches(tokenize(prompts, tokenizer, max_length), batch_size, pad_id_of(tokenizer), padding_side)
    layers = sorted(
        (layer for layer in restorelcc_layers(peft_model) if adapter_name in layer.head_indices),
        key=lambda layer: layer.layer_index,
    )
    if not layers:
        raise ValueError(f"{type(peft_model).__name__} has no RestoreLCC layers for adapter {adapter_name!r}.")
    if any(adapter_name not in layer.restorelcc_magnitude for layer in layers):
        raise ValueError("refine_lost_init sets the magnitudes; the adapter needs use_components=True.")
    target_modules = components.metadata.get("target_modules")
    # 1. Mean dense activation of every pruned head's dense counterpart (one pass; only sums are kept).
    dense_mean = _dense_head_means(dense, components, batches, position, target_modules, progress)
    # 2. Layer by layer, the pruned model with the layers below already compensated.
    return _refine_layers(peft_model, layers, components, dense_mean, batches, position, target_modules, progress,
                          adapter_name)  # fmt: skip
