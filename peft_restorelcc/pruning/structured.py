"""Structured pruning: whole attention heads and FFN channels, the same number in every layer."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..tuner.heads import head_dim_of
from .common import _validate_calibration, find_decoder_layers
from .sequential import _model_device

# Architectures whose blocks are self_attn.{q,k,v,o}_proj + mlp.{gate,up,down}_proj with per-head-dim (or no)
# q/k norms, so that removing heads and FFN channels only narrows Linears and changes config sizes.
# A capability list, not a second architecture table: every entry is an o_proj family of tuner/heads.py's table
# (checked by tests/test_tuner_isolation.py).
STRUCTURED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "granite", "smollm3")


def _structured_parts(block: nn.Module) -> tuple[nn.Module, nn.Module]:
    attention = getattr(block, "self_attn", None)
    mlp = getattr(block, "mlp", None)
    names = ("q_proj", "k_proj", "v_proj", "o_proj")
    if attention is None or mlp is None or not all(isinstance(getattr(attention, n, None), nn.Linear) for n in names):
        raise ValueError("structured pruning expects self_attn.{q,k,v,o}_proj Linears in every block.")
    if not all(isinstance(getattr(mlp, n, None), nn.Linear) for n in ("gate_proj", "up_proj", "down_proj")):
        raise ValueError("structured pruning expects mlp.{gate,up,down}_proj Linears in every block.")
    return attention, mlp


def _sliced_linear(linear: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    weight = linear.weight.detach()
    bias = linear.bias.detach() if linear.bias is not None else None
    if rows is not None:
        weight = weight[rows]
        bias = bias[rows] if bias is not None else None
    if cols is not None:
        weight = weight[:, cols]
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    new.train(linear.training)
    return new


def _head_rows(heads: list[int], head_dim: int, device: torch.device) -> torch.Tensor:
    return torch.tensor([h * head_dim + j for h in heads for j in range(head_dim)], dtype=torch.long, device=device)


@torch.no_grad()
def _activation_norms(
    model: nn.Module, layers: nn.ModuleList, input_ids: torch.Tensor, batch_size: int
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer, ``sum_t a_tj^2`` of the o_proj input (concatenated heads) and of the down_proj input (channels)."""
    attention_sums: list[torch.Tensor | None] = [None] * len(layers)
    ffn_sums: list[torch.Tensor | None] = [None] * len(layers)
    handles = []

    def recorder(store: list, index: int) -> Callable:
        def hook(_module: nn.Module, inputs: tuple) -> None:
            x = inputs[0].detach().float()
            squares = (x * x).reshape(-1, x.shape[-1]).sum(dim=0)
            store[index] = squares if store[index] is None else store[index] + squares

        return hook

    for index, block in enumerate(layers):
        attention, mlp = _structured_parts(block)
        handles.append(attention.o_proj.register_forward_pre_hook(recorder(attention_sums, index)))
        handles.append(mlp.down_proj.register_forward_pre_hook(recorder(ffn_sums, index)))
    was_training = model.training
    model.eval()
    device = _model_device(model)
    try:
        for start in range(0, input_ids.shape[0], batch_size):
            model(input_ids=input_ids[start : start + batch_size].to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return attention_sums, ffn_sums  # type: ignore[return-value]


def _check_arguments(
    model: nn.Module,
    heads_fraction: float,
    ffn_fraction: float,
    calibration_input_ids: torch.Tensor | None,
    importance: str | None,
    batch_size: int,
) -> str:
    """Every check before the model is touched; returns the importance to score by."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in STRUCTURED_MODEL_TYPES:
        raise ValueError(
            f"Structured head/FFN pruning does not support model_type={model_type!r}: it rewrites q/k/v/o and "
            f"gate/up/down projections of the Llama family only ({', '.join(STRUCTURED_MODEL_TYPES)}). Use "
            "prune_model (unstructured or N:M) for other architectures."
        )
    for name, value in (("heads_fraction", heads_fraction), ("ffn_fraction", ffn_fraction)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) < 1.0:
            raise ValueError(f"{name}={value!r} is outside [0, 1): pass the fraction to remove, e.g. 0.25.")
    if importance is None:
        importance = "activation" if calibration_input_ids is not None else "magnitude"
    if importance not in ("magnitude", "activation"):
        raise ValueError(f"Unknown importance {importance!r}: choose 'magnitude' or 'activation'.")
    if importance == "activation" and calibration_input_ids is None:
        raise ValueError("importance='activation' needs calibration_input_ids; pass them or use 'magnitude'.")
    _validate_calibration(calibration_input_ids, None, batch_size)
    return importance


@dataclass(frozen=True)
class _Shape:
    """The attention and MLP sizes before and after: the same in every layer."""

    num_heads: int
    num_kv: int
    head_dim: int
    intermediate: int
    new_heads: int
    new_kv: int
    new_intermediate: int

    @property
    def per_group(self) -> int:
        return self.num_heads // self.num_kv

    @classmethod
    def of(cls, model: nn.Module, heads_fraction: float, ffn_fraction: float) -> _Shape:
        config = model.config
        num_heads = int(config.num_attention_heads)
        num_kv = int(getattr(config, "num_key_value_heads", None) or num_heads)
        intermediate = int(config.intermediate_size)
        per_group = num_heads // num_kv
        if per_group > 1:
            removed = round(heads_fraction * per_group)
            if removed >= per_group:
                raise ValueError(
                    f"heads_fraction={heads_fraction} would remove all {per_group} query heads of each key/value "
                    "group; lower it (at least one query head per group must stay)."
                )
            new_heads, new_kv = num_kv * (per_group - removed), num_kv
        else:
            removed = round(heads_fraction * num_heads)
            if removed >= num_heads:
                raise ValueError(f"heads_fraction={heads_fraction} would remove every head; lower it.")
            new_heads = new_kv = num_heads - removed
        new_intermediate = intermediate - round(ffn_fraction * intermediate)
        if new_intermediate < 1:
            raise ValueError(f"ffn_fraction={ffn_fraction} would remove every FFN channel; lower it.")
        return cls(num_heads, num_kv, head_dim_of(model), intermediate, new_heads, new_kv, new_intermediate)

    def heads_to_keep(self, head_scores: torch.Tensor) -> tuple[list[int], list[int]]:
        """(query heads, key/value heads) kept, ascending: with GQA the best of each group, and every group."""
        if self.per_group > 1:
            keep = []
            for group in range(self.num_kv):
                scores = head_scores[group * self.per_group : (group + 1) * self.per_group]
                best = torch.sort(scores, descending=True, stable=True).indices[: self.new_heads // self.num_kv]
                keep += [group * self.per_group + int(i) for i in best]
            kv_keep = list(range(self.num_kv))
        else:
            keep = [int(i) for i in torch.sort(head_scores, descending=True, stable=True).indices[: self.new_heads]]
            kv_keep = sorted(keep)
        return sorted(keep), kv_keep

    def rewrite(self, config: Any) -> None:
        """The config of the smaller model, so that ``save_pretrained`` output reloads in stock transformers."""
        config.num_attention_heads = self.new_heads
        config.num_key_value_heads = self.new_kv
        config.head_dim = self.head_dim
        config.intermediate_size = self.new_intermediate


def _head_scores(attention: nn.Module, shape: _Shape, activation_sums: torch.Tensor | None) -> torch.Tensor:
    """Each query head's importance: its output-projection column norm times its activation (or q weight) norm."""
    w_o = attention.o_proj.weight.float()
    o_norms = w_o.reshape(w_o.shape[0], shape.num_heads, shape.head_dim).pow(2).sum(dim=(0, 2)).sqrt()
    if activation_sums is not None:
        head_scores = activation_sums.reshape(shape.num_heads, shape.head_dim).sum(dim=1).sqrt() * o_norms
    else:
        q_norms = attention.q_proj.weight.float().reshape(shape.num_heads, shape.head_dim, -1).pow(2).sum(dim=(1, 2))
        head_scores = o_norms * q_norms.sqrt()
    return head_scores.cpu()


def _channels_to_keep(mlp: nn.Module, activation_sums: torch.Tensor | None, new_intermediate: int) -> list[int]:
    """The FFN channels kept, ascending: the highest down-projection column norm times activation (or up and gate
    weight) norm."""
    down_norms = mlp.down_proj.weight.float().pow(2).sum(dim=0).sqrt()
    if activation_sums is not None:
        channel_scores = activation_sums.sqrt() * down_norms
    else:
        channel_scores = (
            down_norms
            * mlp.up_proj.weight.float().pow(2).sum(dim=1).sqrt()
            * mlp.gate_proj.weight.float().pow(2).sum(dim=1).sqrt()
        )
    return sorted(
        int(i) for i in torch.sort(channel_scores.cpu(), descending=True, stable=True).indices[:new_intermediate]
    )


def _slice_block(
    attention: nn.Module, mlp: nn.Module, keep: list[int], kv_keep: list[int], channels: list[int], shape: _Shape
) -> None:
    """Replace one block's projections by their kept rows and columns, and its cached sizes."""
    device = attention.q_proj.weight.device
    q_rows = _head_rows(keep, shape.head_dim, device)
    kv_rows = _head_rows(kv_keep, shape.head_dim, device)
    attention.q_proj = _sliced_linear(attention.q_proj, rows=q_rows)
    attention.k_proj = _sliced_linear(attention.k_proj, rows=kv_rows)
    attention.v_proj = _sliced_linear(attention.v_proj, rows=kv_rows)
    attention.o_proj = _sliced_linear(attention.o_proj, cols=q_rows)
    channel_index = torch.tensor(channels, dtype=torch.long, device=mlp.down_proj.weight.device)
    mlp.gate_proj = _sliced_linear(mlp.gate_proj, rows=channel_index)
    mlp.up_proj = _sliced_linear(mlp.up_proj, rows=channel_index)
    mlp.down_proj = _sliced_linear(mlp.down_proj, cols=channel_index)
    # Attributes cached from the config at construction time.
    if hasattr(attention, "num_key_value_groups"):
        attention.num_key_value_groups = shape.new_heads // shape.new_kv
    if hasattr(attention, "head_dim"):
        attention.head_dim = shape.head_dim
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = shape.new_intermediate


@torch.no_grad()
def _prune_layers(
    layers: nn.ModuleList,
    shape: _Shape,
    attention_sums: list[torch.Tensor] | None,
    ffn_sums: list[torch.Tensor] | None,
) -> tuple[dict[int, list[int]], dict[int, list[int]], dict[int, list[int]]]:
    """Score, choose and slice every block; returns the kept query heads, key/value heads and FFN channels."""
    kept_heads: dict[int, list[int]] = {}
    kept_kv_heads: dict[int, list[int]] = {}
    kept_channel_indices: dict[int, list[int]] = {}
    for index, block in enumerate(layers):
        attention, mlp = _structured_parts(block)
        head_sums = None if attention_sums is None else attention_sums[index]
        keep, kv_keep = shape.heads_to_keep(_head_scores(attention, shape, head_sums))
        channel_sums = None if ffn_sums is None else ffn_sums[index]
        channels = _channels_to_keep(mlp, channel_sums, shape.new_intermediate)
        _slice_block(attention, mlp, keep, kv_keep, channels, shape)
        kept_heads[index], kept_kv_heads[index], kept_channel_indices[index] = keep, kv_keep, channels
    return kept_heads, kept_kv_heads, kept_channel_indices


def structured_prune_heads(
    model: nn.Module,
    heads_fraction: float,
    ffn_fraction: float,
    calibration_input_ids: torch.Tensor | None = None,
    importance: str | None = None,
    batch_size: int = 8,
) -> dict[str, Any]:
    """Remove whole attention heads and FFN channels, the same number in every layer, in place.

    The result is a standard, smaller model: ``config.num_attention_heads``, ``num_key_value_heads``, an explicit
    ``head_dim`` and ``intermediate_size`` are updated, so ``save_pretrained`` output reloads in stock transformers.
    With GQA every key/value group is kept and each group loses the same number of query heads
    (``round(heads_fraction * heads_per_group)``); with plain multi-head attention whole heads (q, k and v) go
    (``round(heads_fraction * num_heads)``). ``round(ffn_fraction * intermediate_size)`` channels go from every MLP.

    Importance: "magnitude" (``||W_o[:, head]|| * ||W_q[head]||``, channels ``||W_down[:, c]|| * ||W_up[c]|| *
    ||W_gate[c]||``) or "activation" (root of the summed squared calibration activation of the head/channel at the
    o_proj/down_proj input, times the same o_proj/down_proj column norm); the default is "activation" when
    ``calibration_input_ids`` is given, else "magnitude".

    Returns a report with ``kept_heads: {layer_index: [dense query head indices kept]}`` (ascending; pruned head j
    of a layer is dense head ``kept_heads[layer][j]``), ``kept_kv_heads``, ``kept_channels: {layer_index: count}``,
    ``kept_channel_indices``, the old and new sizes and the parameter counts.
    """
    started = time.perf_counter()
    importance = _check_arguments(model, heads_fraction, ffn_fraction, calibration_input_ids, importance, batch_size)
    _, layers = find_decoder_layers(model)
    for block in layers:
        _structured_parts(block)
    shape = _Shape.of(model, heads_fraction, ffn_fraction)
    parameters_before = sum(p.numel() for p in model.parameters())
    attention_sums = ffn_sums = None
    if importance == "activation":
        attention_sums, ffn_sums = _activation_norms(model, layers, calibration_input_ids, batch_size)

    kept_heads, kept_kv_heads, kept_channel_indices = _prune_layers(layers, shape, attention_sums, ffn_sums)
    shape.rewrite(model.config)
    return {
        "method": "structured",
        "importance": importance,
        "heads_fraction": float(heads_fraction),
        "ffn_fraction": float(ffn_fraction),
        "num_attention_heads": {"before": shape.num_heads, "after": shape.new_heads},
        "num_key_value_heads": {"before": shape.num_kv, "after": shape.new_kv},
        "head_dim": shape.head_dim,
        "intermediate_size": {"before": shape.intermediate, "after": shape.new_intermediate},
        "kept_heads": kept_heads,
        "kept_kv_heads": kept_kv_heads,
        "kept_channels": {index: len(channels) for index, channels in kept_channel_indices.items()},
        "kept_channel_indices": kept_channel_indices,
        "parameters_before": parameters_before,
        "parameters_after": sum(p.numel() for p in model.parameters()),
        "seconds": time.perf_counter() - started,
    }
