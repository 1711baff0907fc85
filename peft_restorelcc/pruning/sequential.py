"""The shared layer-by-layer driver and ``prune_model``: the calibration batch goes through the blocks one at a
time, each block's projection inputs are gathered with hooks, the block is pruned by its method, and its outputs are
recomputed with the pruned weights to become the next block's inputs."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .choices import METHODS, resolve_sparsity
from .common import (
    _apply_to_weight,
    _block_projections,
    _execution_device,
    _validate_calibration,
    _weight_matrix,
    find_decoder_layers,
    measure_sparsity,
)
from .magnitude import magnitude_prune_weight
from .sparsegpt import sparsegpt_prune_weight
from .wanda import wanda_prune_weight


class _StopForward(Exception):
    """Raised by the pre-hook on the first block once its inputs are captured: the rest of the model is not needed."""


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to_device(item, device) for item in value)
    if isinstance(value, list):
        return [_to_device(item, device) for item in value]
    if isinstance(value, dict):
        return {key: _to_device(item, device) for key, item in value.items()}
    return value


def _model_device(model: nn.Module) -> torch.device:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None:
        return _execution_device(embeddings) or embeddings.weight.device
    return next(model.parameters()).device


def _block_device(block: nn.Module) -> torch.device:
    """The device the block computes on: accelerate's execution device when dispatched (its weights may be
    offloaded, on the meta device), else its weights' device."""
    return _execution_device(block) or next(block.parameters()).device


class _BlockInput:
    """The inputs of one calibration batch to the current block: hidden states plus the other args and kwargs."""

    def __init__(self, hidden: torch.Tensor, args: tuple, kwargs: dict, token_mask: torch.Tensor | None) -> None:
        self.hidden = hidden
        self.args = args
        self.kwargs = kwargs
        self.token_mask = token_mask


@torch.no_grad()
def _capture_first_block_inputs(
    model: nn.Module,
    first_block: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    batch_size: int,
) -> list[_BlockInput]:
    """Run the embeddings (and whatever precedes the first block) and keep each batch's inputs to the first block.

    A pre-hook on the first block records its positional args and kwargs (attention mask, position embeddings ...)
    and raises a sentinel, so nothing past the embeddings runs.
    """
    device = _model_device(model)
    captured: list[tuple[tuple, dict]] = []

    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured.append((args, dict(kwargs)))
        raise _StopForward

    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    batches: list[_BlockInput] = []
    try:
        for start in range(0, input_ids.shape[0], batch_size):
            ids = input_ids[start : start + batch_size].to(device)
            mask = None if attention_mask is None else attention_mask[start : start + batch_size].to(device)
            try:
                model(input_ids=ids, attention_mask=mask, use_cache=False)
            except _StopForward:
                pass
            if len(captured) != len(batches) + 1:
                raise ValueError(
                    f"{type(model).__name__}: the forward pass never reached the first decoder block, so its inputs "
                    "cannot be captured for calibration."
                )
            args, kwargs = captured[-1]
            if args:
                hidden, rest = args[0], tuple(args[1:])
            else:
                hidden, rest = kwargs.pop("hidden_states"), ()
            kwargs.pop("use_cache", None)
            kwargs["use_cache"] = False
            batches.append(_BlockInput(hidden, rest, kwargs, mask))
    finally:
        handle.remove()
    return batches


def _run_block(block: nn.Module, batch: _BlockInput) -> torch.Tensor:
    device = _block_device(block)
    output = block(batch.hidden.to(device), *_to_device(batch.args, device), **_to_device(batch.kwargs, device))
    # transformers 5 blocks return a tensor; older ones (and some remote code) a tuple led by the hidden states.
    return output[0] if isinstance(output, (tuple, list)) else output


class _InputStatistics:
    """Accumulates, per projection, what the pruning method needs from its inputs.

    Wanda: ``sum_t x_tj^2`` per input column. SparseGPT: ``sum_t x_t x_t^T``. Padding tokens are left out.
    """

    def __init__(self, modules: dict[str, nn.Module], need_hessian: bool) -> None:
        self.modules = modules
        self.need_hessian = need_hessian
        self.sq_norms: dict[str, torch.Tensor] = {}
        self.hessians: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}
        self.token_mask: torch.Tensor | None = None
        self._handles: list = []

    def __enter__(self) -> _InputStatistics:
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, name: str) -> Callable:
        def hook(_module: nn.Module, inputs: tuple, _output: Any) -> None:
            x = inputs[0].detach()
            width = x.shape[-1]
            mask = self.token_mask
            if mask is not None and tuple(mask.shape) == tuple(x.shape[:-1]):
                x = x[mask.to(x.device).bool()]
            x = x.reshape(-1, width).float()
            if name not in self.sq_norms:
                self.sq_norms[name] = torch.zeros(width, device=x.device)
                self.tokens[name] = 0
                if self.need_hessian:
                    self.hessians[name] = torch.zeros(width, width, device=x.device)
            self.sq_norms[name] += (x * x).sum(dim=0)
            self.tokens[name] += x.shape[0]
            if self.need_hessian:
                self.hessians[name].addmm_(x.t(), x)

        return hook

    def hessian(self, name: str) -> torch.Tensor:
        return self.hessians[name] * (2.0 / max(self.tokens[name], 1))


def _prune_block_with_statistics(
    projections: dict[str, nn.Module], stats: _InputStatistics, method: str, sparsity: float, nm: tuple[int, int] | None
) -> None:
    for name, module in projections.items():
        if name not in stats.sq_norms:
            # Never called during calibration (e.g. an unused expert): fall back to magnitude.
            _apply_to_weight(module, lambda w: magnitude_prune_weight(w, sparsity, nm))
        elif method == "wanda":
            _apply_to_weight(module, lambda w, n=name: wanda_prune_weight(w, stats.sq_norms[n], sparsity, nm))
        else:
            _apply_to_weight(module, lambda w, n=name: sparsegpt_prune_weight(w, stats.hessian(n), sparsity, nm))


# ----------------------------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------------------------


def _check_pattern_fits(blocks: list[dict[str, nn.Module]], nm: tuple[int, int]) -> None:
    """Every projection's input width must be a multiple of M for an N:M pattern."""
    for block in blocks:
        for name, module in block.items():
            width = _weight_matrix(module).shape[1]
            if width % nm[1] != 0:
                raise ValueError(
                    f"{name} has {width} input features, not a multiple of M={nm[1]}: pattern {nm[0]}:{nm[1]} "
                    "cannot be applied. Choose an M that divides every projection's input width."
                )


def prune_model(
    model: nn.Module,
    method: str,
    sparsity: float | None,
    pattern: str | tuple[int, int] | None = None,
    calibration_input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, Any]:
    """Prune every projection inside the decoder blocks of ``model`` in place.

    ``method``: "magnitude", "wanda" or "sparsegpt". ``sparsity``: fraction of weights zeroed in [0, 1), or None
    with a ``pattern`` ("2:4", "4:8", ``(N, M)``), which implies ``1 - N/M``. Wanda and SparseGPT need
    ``calibration_input_ids`` (samples x tokens); ``attention_mask`` (same shape) leaves padding out of the
    statistics. Returns ``{"method", "sparsity_target", "pattern", "layers": {module_name: achieved_sparsity},
    "overall_sparsity", "seconds"}``.
    """
    started = time.perf_counter()
    # --- validate everything first: a ValueError must leave the model untouched ---
    if method not in METHODS:
        raise ValueError(f"Unknown pruning method {method!r}: choose one of {', '.join(METHODS)}.")
    target, nm = resolve_sparsity(sparsity, pattern)
    _validate_calibration(calibration_input_ids, attention_mask, batch_size)
    if method != "magnitude" and calibration_input_ids is None:
        raise ValueError(
            f"{method} needs calibration inputs: pass calibration_input_ids (samples x tokens, e.g. 128 x 128 token "
            "windows of plain text), or use method='magnitude', which needs none."
        )
    layers_name, layers = find_decoder_layers(model)
    blocks = [_block_projections(layers_name, index, block) for index, block in enumerate(layers)]
    if not any(blocks):
        raise ValueError(f"{type(model).__name__}: the decoder layers contain no nn.Linear/Conv1D to prune.")
    if nm is not None:
        _check_pattern_fits(blocks, nm)

    pattern_text = None if nm is None else f"{nm[0]}:{nm[1]}"
    if target > 0:
        if method == "magnitude":
            for block in tqdm(blocks, desc="magnitude pruning", unit="layer", disable=not progress):
                for module in block.values():
                    _apply_to_weight(module, lambda w: magnitude_prune_weight(w, target, nm))
        else:
            _prune_sequentially(
                model, layers, blocks, method, target, nm, calibration_input_ids, attention_mask, batch_size, progress
            )

    measured = measure_sparsity(model)
    return {
        "method": method,
        "sparsity_target": target,
        "pattern": pattern_text,
        "layers": measured["layers"],
        "overall_sparsity": measured["overall_sparsity"],
        "seconds": time.perf_counter() - started,
    }


@torch.no_grad()
def _prune_sequentially(
    model: nn.Module,
    layers: nn.ModuleList,
    blocks: list[dict[str, nn.Module]],
    method: str,
    sparsity: float,
    nm: tuple[int, int] | None,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    batch_size: int,
    progress: bool,
) -> None:
    was_training = model.training
    model.eval()
    try:
        batches = _capture_first_block_inputs(model, layers[0], input_ids, attention_mask, batch_size)
        for block, projections in tqdm(
            list(zip(layers, blocks)), desc=f"{method} pruning", unit="layer", disable=not progress
        ):
            with _InputStatistics(projections, need_hessian=method == "sparsegpt") as stats:
                for batch in batches:
                    stats.token_mask = batch.token_mask
                    _run_block(block, batch)
            _prune_block_with_statistics(projections, stats, method, sparsity, nm)
            del stats
            # The next block sees what this block produces with its pruned weights.
            for batch in batches:
                batch.hidden = _run_block(block, batch)
    finally:
        model.train(was_training)
