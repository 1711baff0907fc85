"""Pruning of decoder-only LLMs: magnitude, Wanda, SparseGPT (unstructured or N:M) and uniform structured pruning.

Conventions

* Only the projections inside the decoder blocks are pruned (``nn.Linear`` and transformers' ``Conv1D``, whose weight
  is stored ``in x out``). Embeddings, the final norm and ``lm_head`` stay dense.
* Unstructured magnitude and Wanda pruning compare weights within each output row (as the Wanda paper does), so every
  row, and therefore every layer, gets ``round(in_features * sparsity)`` zeros. SparseGPT chooses its mask per block of
  128 input columns over all rows (the paper's adaptive mask selection), with the count per block chosen so that the
  whole layer lands on ``round(rows * cols * sparsity)`` zeros.
* ``N:M`` has the meaning of the Wanda and SparseGPT papers: at most ``N`` non-zeros in every group of ``M``
  consecutive input weights of a row, so the pattern implies ``sparsity = 1 - N / M`` ("2:4" and "4:8" are 50%).
  ``sparsity`` may then be omitted (``None``); a value that disagrees with the pattern is rejected.
* Wanda and SparseGPT run layer by layer: the calibration batch goes through the blocks one at a time, the inputs of
  every projection of a block are gathered with forward hooks, the block is pruned, and the block's outputs are then
  recomputed with the pruned weights to become the next block's inputs.
* Everything is validated before the model is touched: a ValueError leaves the model as it was.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from .files import staged_output_dir
from .heads import head_dim_of, text_config

METHODS = ("magnitude", "wanda", "sparsegpt")
REPORT_FILE = "pruning_report.json"

# SparseGPT settings from the paper: 1% dampening of the mean Hessian diagonal, masks chosen per 128 columns.
SPARSEGPT_BLOCK_SIZE = 128
SPARSEGPT_DAMPENING = 0.01

# Architectures whose blocks are self_attn.{q,k,v,o}_proj + mlp.{gate,up,down}_proj with per-head-dim (or no)
# q/k norms, so that removing heads and FFN channels only narrows Linears and changes config sizes.
STRUCTURED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "granite", "smollm3")


# ----------------------------------------------------------------------------------------------------------------
# Validation helpers
# ----------------------------------------------------------------------------------------------------------------


def parse_pattern(pattern: str | tuple[int, int] | list[int] | None) -> tuple[int, int] | None:
    """``"2:4"`` or ``(2, 4)`` -> ``(2, 4)``; ``None``/``"unstructured"`` -> ``None``. ValueError when malformed."""
    if pattern is None:
        return None
    if isinstance(pattern, str):
        text = pattern.strip().lower()
        if text in ("", "none", "unstructured"):
            return None
        parts = text.split(":")
        if len(parts) != 2 or not all(part.strip().isdigit() for part in parts):
            raise ValueError(
                f"Malformed N:M pattern {pattern!r}: write it as two integers 'N:M' with 0 < N < M, e.g. '2:4' "
                "(at most 2 non-zeros in every 4 consecutive weights) or '4:8'."
            )
        n, m = int(parts[0]), int(parts[1])
    elif isinstance(pattern, (tuple, list)) and len(pattern) == 2 and all(isinstance(v, int) for v in pattern):
        n, m = int(pattern[0]), int(pattern[1])
    else:
        raise ValueError(f"Malformed N:M pattern {pattern!r}: pass a string such as '2:4' or a tuple (2, 4).")
    if not 0 < n < m:
        raise ValueError(
            f"Invalid N:M pattern {n}:{m}: N is the number of non-zeros kept in every M consecutive weights, so it "
            "needs 0 < N < M (e.g. '2:4' for 50%, '4:8' for 50%, '1:4' for 75%)."
        )
    return n, m


def resolve_sparsity(
    sparsity: float | None, pattern: str | tuple[int, int] | None = None
) -> tuple[float, tuple[int, int] | None]:
    """Validate a sparsity/pattern pair: ``(sparsity, (N, M) or None)``; an N:M pattern implies ``1 - N/M``."""
    nm = parse_pattern(pattern)
    return _resolve_sparsity(sparsity, nm), nm


def _resolve_sparsity(sparsity: float | None, nm: tuple[int, int] | None) -> float:
    if nm is not None:
        implied = 1.0 - nm[0] / nm[1]
        if sparsity is None:
            return implied
        if not isinstance(sparsity, (int, float)) or abs(float(sparsity) - implied) > 1e-6:
            raise ValueError(
                f"sparsity={sparsity!r} disagrees with pattern {nm[0]}:{nm[1]}, which keeps {nm[0]} of every {nm[1]} "
                f"weights and so implies sparsity={implied:g}. Pass sparsity={implied:g} or omit it (None)."
            )
        return implied
    if sparsity is None:
        raise ValueError("sparsity is required for unstructured pruning: pass a fraction in [0, 1), e.g. 0.5.")
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= float(sparsity) < 1.0:
        raise ValueError(f"sparsity={sparsity!r} is outside [0, 1): pass the fraction of weights to zero, e.g. 0.5.")
    return float(sparsity)


def _validate_calibration(input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None, batch_size: int) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}: pass a positive integer.")
    if input_ids is None:
        return
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[0] == 0:
        raise ValueError(
            "calibration_input_ids must be a 2-D LongTensor (samples x tokens) with at least one sample, got "
            f"{type(input_ids).__name__} of shape {tuple(getattr(input_ids, 'shape', ()))}."
        )
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"calibration_input_ids must hold token ids (int64), got dtype {input_ids.dtype}.")
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(
            f"attention_mask shape {tuple(attention_mask.shape)} differs from calibration_input_ids shape "
            f"{tuple(input_ids.shape)}: pass one mask entry per token (or None)."
        )


# ----------------------------------------------------------------------------------------------------------------
# Finding blocks and projections
# ----------------------------------------------------------------------------------------------------------------


def _is_prunable(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D))


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of decoder blocks (``model.layers``, ``transformer.h``, ``gpt_neox.layers`` ...) and its name.

    Found generically: among the ModuleLists that contain projections, the one whose length equals the config's
    ``num_hidden_layers`` and that holds the most parameters (expert lists inside a block are smaller).
    """
    config = getattr(model, "config", None)
    expected = getattr(text_config(config), "num_hidden_layers", None) if config is not None else None
    candidates: list[tuple[bool, int, str, nn.ModuleList]] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if not any(_is_prunable(sub) for sub in module.modules()):
            continue
        size = sum(parameter.numel() for parameter in module.parameters())
        candidates.append((len(module) == expected, size, name, module))
    if not candidates:
        raise ValueError(
            f"Cannot find the decoder layers of {type(model).__name__}: no nn.ModuleList of blocks containing "
            "nn.Linear/Conv1D projections (such as model.layers, transformer.h, gpt_neox.layers or "
            "model.decoder.layers). Pass a transformers causal LM."
        )
    candidates.sort(key=lambda item: (item[0], item[1]), reverse=True)
    _, _, name, layers = candidates[0]
    return name, layers


def _block_projections(layers_name: str, index: int, block: nn.Module) -> dict[str, nn.Module]:
    prefix = f"{layers_name}.{index}." if layers_name else f"{index}."
    return {prefix + name: module for name, module in block.named_modules() if _is_prunable(module)}


def _all_projections(model: nn.Module) -> list[dict[str, nn.Module]]:
    layers_name, layers = find_decoder_layers(model)
    return [_block_projections(layers_name, index, block) for index, block in enumerate(layers)]


def _weight_matrix(module: nn.Module) -> torch.Tensor:
    """The weight as out x in (a view: a Conv1D weight is stored in x out)."""
    return module.weight.t() if isinstance(module, Conv1D) else module.weight


# ----------------------------------------------------------------------------------------------------------------
# Models dispatched by accelerate (device_map): blocks on several devices, or offloaded to CPU RAM / disk
# ----------------------------------------------------------------------------------------------------------------


def _hooks(module: nn.Module) -> list[Any]:
    hook = getattr(module, "_hf_hook", None)
    return [] if hook is None else [hook, *getattr(hook, "hooks", [])]


def _offload_hook(module: nn.Module) -> Any | None:
    """accelerate's hook that keeps this module's weights off the device (on the meta device in the module)."""
    for hook in _hooks(module):
        if getattr(hook, "offload", False) and getattr(hook, "weights_map", None) is not None:
            return hook
    return None


def _execution_device(module: nn.Module) -> torch.device | None:
    """Where accelerate runs this module (its hook's execution device), or None when it is not dispatched."""
    for candidate in module.modules():
        for hook in _hooks(candidate):
            device = getattr(hook, "execution_device", None)
            if device is not None:
                return device if isinstance(device, torch.device) else torch.device(device)
    return None


def read_weight(module: nn.Module) -> torch.Tensor:
    """A projection's weight as stored (in x out for Conv1D), also when accelerate offloaded it (then from the
    offload hook's weights map, on CPU)."""
    weight = module.weight.detach()
    if weight.device.type != "meta":
        return weight
    hook = _offload_hook(module)
    if hook is None or "weight" not in hook.weights_map:
        raise ValueError(f"{type(module).__name__} has its weight on the meta device and no offloaded copy to read.")
    return hook.weights_map["weight"]


def _write_offloaded_weight(module: nn.Module, value: torch.Tensor) -> None:
    """Replace an offloaded weight in accelerate's weights map. Offloaded-to-disk weights are read from the user's
    checkpoint files, which are never written: the pruned weight goes into the loader's in-memory state dict (CPU
    RAM), which accelerate reads first."""
    weights_map = _offload_hook(module).weights_map
    dataset = getattr(weights_map, "dataset", weights_map)
    key = getattr(weights_map, "prefix", "") + "weight"
    store = getattr(dataset, "state_dict", dataset)
    store[key] = value.detach().to("cpu")


# ----------------------------------------------------------------------------------------------------------------
# Masks
# ----------------------------------------------------------------------------------------------------------------


def _lowest_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask (True = prune) of the k lowest scores of every row; stable sort so ties are deterministic."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k > 0:
        order = torch.sort(scores, dim=-1, stable=True).indices[..., :k]
        mask.scatter_(-1, order, True)
    return mask


def _row_mask(scores: torch.Tensor, sparsity: float, nm: tuple[int, int] | None) -> torch.Tensor:
    """Prune mask from per-weight scores (out x in): per row, or per group of M for N:M."""
    rows, cols = scores.shape
    if nm is not None:
        n, m = nm
        grouped = scores.reshape(rows, cols // m, m)
        return _lowest_mask(grouped, m - n).reshape(rows, cols)
    return _lowest_mask(scores, round(cols * sparsity))


def check_nm_pattern(weight: torch.Tensor, n: int, m: int) -> bool:
    """True when every group of ``m`` consecutive entries along the last dim holds at most ``n`` non-zeros.

    The last dim is the input dim of an ``nn.Linear`` weight (out x in); pass ``weight.t()`` for a Conv1D. A width
    that ``m`` does not divide cannot hold the pattern and gives False.
    """
    if not 0 < n < m:
        raise ValueError(f"Invalid N:M pattern {n}:{m}: need 0 < N < M.")
    if weight.shape[-1] % m != 0:
        return False
    groups = weight.detach().reshape(-1, m)
    return bool(((groups != 0).sum(dim=-1) <= n).all())


def measure_sparsity(model: nn.Module) -> dict[str, Any]:
    """Fraction of exact zeros per projection inside the decoder blocks and overall (embeddings/lm_head excluded).

    Returns ``{"layers": {module_name: sparsity}, "overall_sparsity": float, "zeros": int, "total": int}``.
    """
    layers: dict[str, float] = {}
    zeros = total = 0
    for block in _all_projections(model):
        for name, module in block.items():
            weight = read_weight(module)
            block_zeros = int((weight == 0).sum())
            layers[name] = block_zeros / weight.numel()
            zeros += block_zeros
            total += weight.numel()
    return {"layers": layers, "overall_sparsity": zeros / total if total else 0.0, "zeros": zeros, "total": total}


def hold_pruned_weights_at_zero(model: nn.Module) -> list[torch.utils.hooks.RemovableHandle]:
    """Make training keep the model's sparsity: every decoder projection's gradient is zeroed where its weight is
    zero now, so optimisers whose step is zero on a zero gradient (SGD, Adam and AdamW without weight decay; decoupled
    decay only shrinks a zero) leave the pruned weights at exactly zero. Lets the whole pruned model be fine-tuned
    (sparse fine-tuning, the usual ceiling for parameter-efficient recovery) without a merge that densifies it.
    Returns the hooks' handles (``handle.remove()`` lets the weights move again)."""
    handles = []
    for block in _all_projections(model):
        for module in block.values():
            kept = module.weight.detach() != 0
            handles.append(module.weight.register_hook(lambda gradient, kept=kept: gradient * kept))
    return handles


# ----------------------------------------------------------------------------------------------------------------
# Pruning one weight
# ----------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def magnitude_prune_weight(weight: torch.Tensor, sparsity: float, nm: tuple[int, int] | None = None) -> torch.Tensor:
    """Zero the smallest-|w| weights of every row (out x in) in place; returns the prune mask."""
    mask = _row_mask(weight.detach().abs().float(), sparsity, nm)
    weight[mask] = 0
    return mask


@torch.no_grad()
def wanda_prune_weight(
    weight: torch.Tensor, input_sq_norms: torch.Tensor, sparsity: float, nm: tuple[int, int] | None = None
) -> torch.Tensor:
    """Wanda: zero the lowest ``|W_ij| * ||X_j||_2`` of every row in place; ``input_sq_norms[j] = sum_t x_tj^2``."""
    scores = weight.detach().abs().float() * input_sq_norms.float().sqrt().to(weight.device).unsqueeze(0)
    mask = _row_mask(scores, sparsity, nm)
    weight[mask] = 0
    return mask


def _inverse_hessian_factor(hessian: torch.Tensor, dampening: float) -> torch.Tensor:
    """Upper Cholesky factor U of H^-1 (H^-1 = U^T U) after dampening; raises dampening if H is ill-conditioned.

    Row i of U, divided by U[i, i], is the OBS update of the columns after i once columns < i are fixed, which is what
    lets SparseGPT reuse one factorisation for the whole sequence of column eliminations.

    Computed without forming H^-1: with J the reversal permutation, chol(J H J) = M gives H = R R^T for the upper
    triangular R = J M J, so H^-1 = R^-T R^-1 and U = R^-1 (one Cholesky and one triangular solve; this is also far
    faster than ``cholesky_inverse``, which was measured at 100x slower on a busy 2-core CPU).
    """
    columns = hessian.shape[0]
    diagonal = torch.arange(columns, device=hessian.device)
    identity = torch.eye(columns, dtype=hessian.dtype, device=hessian.device)
    damp = dampening * hessian.diagonal().mean().clamp_min(1e-8)
    for _ in range(6):
        damped = hessian.clone()
        damped[diagonal, diagonal] += damp
        lower, info = torch.linalg.cholesky_ex(damped.flip(0, 1))
        if int(info) == 0:
            upper = torch.linalg.solve_triangular(lower.flip(0, 1), identity, upper=True)
            if bool(torch.isfinite(upper).all()):
                return upper
        damp = damp * 10
    raise ValueError("SparseGPT: the calibration Hessian is not positive definite even with heavy dampening.")


@torch.no_grad()
def sparsegpt_prune_weight(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    block_size: int = SPARSEGPT_BLOCK_SIZE,
    dampening: float = SPARSEGPT_DAMPENING,
) -> torch.Tensor:
    """SparseGPT (Frantar & Alistarh, 2023) on one weight (out x in), in place; returns the prune mask.

    ``hessian`` is ``2 X X^T / tokens`` over the layer's calibration inputs (in x in). Columns are processed left to
    right; each pruned weight's error is spread over the not-yet-processed columns of its row with the optimal brain
    surgeon update ``-err * Hinv[i, i:] / Hinv[i, i]``, lazily across blocks of ``block_size`` columns. The mask of
    each block is chosen just before the block is processed, from the already updated weights, by the OBS saliency
    ``w^2 / Hinv[i, i]^2`` (per N:M group when a pattern is given).
    """
    rows, cols = weight.shape
    work = weight.detach().float().clone()
    hessian = hessian.float().clone().to(work.device)
    # A column that never saw a non-zero input carries no signal: give it a unit curvature so H stays invertible.
    dead = hessian.diagonal() == 0
    hessian[dead, dead] = 1.0
    factor = _inverse_hessian_factor(hessian, dampening)

    if nm is not None:
        # Block boundaries must not split an N:M group.
        block_size = max(nm[1], (block_size // nm[1]) * nm[1])
    total_to_prune = round(rows * cols * sparsity)
    pruned_so_far = 0
    mask = torch.zeros(rows, cols, dtype=torch.bool, device=work.device)

    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        width = end - start
        block = work[:, start:end].clone()
        block_factor = factor[start:end, start:end]
        block_diag = block_factor.diagonal()
        errors = torch.zeros_like(block)
        block_mask = torch.zeros_like(block, dtype=torch.bool)
        if nm is None:
            # Spread the layer's quota over the blocks so the layer ends exactly on target.
            quota = round(total_to_prune * end / cols) - pruned_so_far
            saliency = (block**2) / (block_diag.unsqueeze(0) ** 2)
            if quota > 0:
                flat = torch.sort(saliency.flatten(), stable=True).indices[:quota]
                block_mask.view(-1)[flat] = True
            pruned_so_far += quota
        # error_i = w_i * [pruned] / Hinv_ii: the scale is fixed once the block's mask is known (N:M fills it lazily).
        scale = block_mask / block_diag.unsqueeze(0)
        for i in range(width):
            if nm is not None and i % nm[1] == 0:
                group = block[:, i : i + nm[1]]
                saliency = group**2 / (block_diag[i : i + nm[1]].unsqueeze(0) ** 2)
                block_mask[:, i : i + nm[1]] = _lowest_mask(saliency, nm[1] - nm[0])
                scale[:, i : i + nm[1]] = block_mask[:, i : i + nm[1]] / block_diag[i : i + nm[1]].unsqueeze(0)
            error = block[:, i] * scale[:, i]
            errors[:, i] = error
            # OBS: compensate the removed weights with the remaining columns of this block (column i itself
            # becomes w_i - error_i * Hinv_ii, i.e. zero where pruned) ...
            block[:, i:].addr_(error, block_factor[i, i:], alpha=-1)
        block[block_mask] = 0  # exact zeros, not rounding residue
        work[:, start:end] = block
        # ... and, once per block, with all columns to the right of it.
        work[:, end:] -= errors @ factor[start:end, end:]
        mask[:, start:end] = block_mask

    work[mask] = 0
    weight.copy_(work.to(weight.dtype))
    return mask


# ----------------------------------------------------------------------------------------------------------------
# Layer-by-layer calibration
# ----------------------------------------------------------------------------------------------------------------


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


def _apply_to_weight(module: nn.Module, prune: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Run an in-place out x in pruning function on a Linear or Conv1D weight (offloaded ones included: pruned on
    the execution device, written back to accelerate's weights map)."""
    with torch.no_grad():
        offloaded = module.weight.device.type == "meta"
        stored = read_weight(module)
        if offloaded:
            stored = stored.to(_execution_device(module) or stored.device, copy=True)
        if isinstance(module, Conv1D):
            matrix = stored.t().contiguous()
            prune(matrix)
            stored.copy_(matrix.t())
        else:
            prune(stored)
        if offloaded:
            _write_offloaded_weight(module, stored)


# ----------------------------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------------------------


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
        for block in blocks:
            for name, module in block.items():
                width = _weight_matrix(module).shape[1]
                if width % nm[1] != 0:
                    raise ValueError(
                        f"{name} has {width} input features, not a multiple of M={nm[1]}: pattern {nm[0]}:{nm[1]} "
                        "cannot be applied. Choose an M that divides every projection's input width."
                    )

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


# ----------------------------------------------------------------------------------------------------------------
# Structured pruning (whole heads and FFN channels, uniform across layers)
# ----------------------------------------------------------------------------------------------------------------


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
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
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

    _, layers = find_decoder_layers(model)
    for block in layers:
        _structured_parts(block)
    num_heads = int(config.num_attention_heads)
    num_kv = int(getattr(config, "num_key_value_heads", None) or num_heads)
    head_dim = head_dim_of(model)
    intermediate = int(config.intermediate_size)
    per_group = num_heads // num_kv
    if per_group > 1:
        removed = round(heads_fraction * per_group)
        if removed >= per_group:
            raise ValueError(
                f"heads_fraction={heads_fraction} would remove all {per_group} query heads of each key/value group; "
                "lower it (at least one query head per group must stay)."
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

    parameters_before = sum(p.numel() for p in model.parameters())
    if importance == "activation":
        attention_sums, ffn_sums = _activation_norms(model, layers, calibration_input_ids, batch_size)

    kept_heads: dict[int, list[int]] = {}
    kept_kv_heads: dict[int, list[int]] = {}
    kept_channel_indices: dict[int, list[int]] = {}
    with torch.no_grad():
        for index, block in enumerate(layers):
            attention, mlp = _structured_parts(block)
            w_o = attention.o_proj.weight.float()
            o_norms = w_o.reshape(w_o.shape[0], num_heads, head_dim).pow(2).sum(dim=(0, 2)).sqrt()
            if importance == "activation":
                head_scores = attention_sums[index].reshape(num_heads, head_dim).sum(dim=1).sqrt() * o_norms
            else:
                q_norms = attention.q_proj.weight.float().reshape(num_heads, head_dim, -1).pow(2).sum(dim=(1, 2))
                head_scores = o_norms * q_norms.sqrt()
            head_scores = head_scores.cpu()
            if per_group > 1:
                keep = []
                for group in range(num_kv):
                    scores = head_scores[group * per_group : (group + 1) * per_group]
                    best = torch.sort(scores, descending=True, stable=True).indices[: new_heads // num_kv]
                    keep += [group * per_group + int(i) for i in best]
                kv_keep = list(range(num_kv))
            else:
                keep = [int(i) for i in torch.sort(head_scores, descending=True, stable=True).indices[:new_heads]]
                kv_keep = sorted(keep)
            keep = sorted(keep)

            down = mlp.down_proj.weight.float()
            down_norms = down.pow(2).sum(dim=0).sqrt()
            if importance == "activation":
                channel_scores = ffn_sums[index].sqrt() * down_norms
            else:
                channel_scores = (
                    down_norms
                    * mlp.up_proj.weight.float().pow(2).sum(dim=1).sqrt()
                    * mlp.gate_proj.weight.float().pow(2).sum(dim=1).sqrt()
                )
            channels = sorted(
                int(i)
                for i in torch.sort(channel_scores.cpu(), descending=True, stable=True).indices[:new_intermediate]
            )

            device = attention.q_proj.weight.device
            q_rows = _head_rows(keep, head_dim, device)
            kv_rows = _head_rows(kv_keep, head_dim, device)
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
                attention.num_key_value_groups = new_heads // new_kv
            if hasattr(attention, "head_dim"):
                attention.head_dim = head_dim
            if hasattr(mlp, "intermediate_size"):
                mlp.intermediate_size = new_intermediate
            kept_heads[index] = keep
            kept_kv_heads[index] = kv_keep
            kept_channel_indices[index] = channels

    config.num_attention_heads = new_heads
    config.num_key_value_heads = new_kv
    config.head_dim = head_dim
    config.intermediate_size = new_intermediate
    return {
        "method": "structured",
        "importance": importance,
        "heads_fraction": float(heads_fraction),
        "ffn_fraction": float(ffn_fraction),
        "num_attention_heads": {"before": num_heads, "after": new_heads},
        "num_key_value_heads": {"before": num_kv, "after": new_kv},
        "head_dim": head_dim,
        "intermediate_size": {"before": intermediate, "after": new_intermediate},
        "kept_heads": kept_heads,
        "kept_kv_heads": kept_kv_heads,
        "kept_channels": {index: len(channels) for index, channels in kept_channel_indices.items()},
        "kept_channel_indices": kept_channel_indices,
        "parameters_before": parameters_before,
        "parameters_after": sum(p.numel() for p in model.parameters()),
        "seconds": time.perf_counter() - started,
    }


def normalise_report_keys(report: dict[str, Any]) -> dict[str, Any]:
    """Turn the string layer keys JSON gives back (``"0"``) into ints for the per-layer maps of a loaded report."""
    fixed = dict(report)
    for key in ("kept_heads", "kept_kv_heads", "kept_channels", "kept_channel_indices"):
        if isinstance(fixed.get(key), dict):
            fixed[key] = {int(layer): value for layer, value in fixed[key].items()}
    if isinstance(fixed.get("structured"), dict):
        fixed["structured"] = normalise_report_keys(fixed["structured"])
    return fixed


def load_report(model_dir: str | os.PathLike) -> dict[str, Any]:
    """Read ``pruning_report.json`` of a pruned model directory (layer keys back to ints)."""
    with open(Path(model_dir) / REPORT_FILE, encoding="utf-8") as handle:
        return normalise_report_keys(json.load(handle))


# ----------------------------------------------------------------------------------------------------------------
# Calibration windows
# ----------------------------------------------------------------------------------------------------------------


def calibration_windows(tokenizer: Any, texts: list[str], samples: int, seq_len: int) -> torch.Tensor:
    """``samples x seq_len`` token ids cut from ``texts``, deterministically.

    The texts are tokenized without special tokens, joined with the EOS token (when the tokenizer has one) into one
    stream, and cut into non-overlapping windows of ``seq_len``; ``samples`` windows evenly spaced over the whole
    stream are returned, so short passages are not a problem and the sample covers the corpus, not its first pages.
    """
    if samples < 1 or seq_len < 1:
        raise ValueError(f"calibration needs samples >= 1 and seq_len >= 1, got samples={samples}, seq_len={seq_len}.")
    encoded = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    separator = [tokenizer.eos_token_id] if getattr(tokenizer, "eos_token_id", None) is not None else []
    stream: list[int] = []
    for ids in encoded:
        stream.extend(ids)
        stream.extend(separator)
    available = len(stream) // seq_len
    if available < samples:
        raise ValueError(
            f"The calibration text gives only {available} windows of {seq_len} tokens ({len(stream)} tokens), fewer "
            f"than the {samples} samples asked for: lower --calibration-samples or --seq-len."
        )
    windows = torch.tensor(stream[: available * seq_len], dtype=torch.long).reshape(available, seq_len)
    # Evenly spaced window indices, first and last included.
    picks = [(i * (available - 1)) // max(samples - 1, 1) for i in range(samples)] if samples > 1 else [0]
    return windows[picks].clone()


# ----------------------------------------------------------------------------------------------------------------
# Saving
# ----------------------------------------------------------------------------------------------------------------


def _json_ready(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(key): _json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(item) for item in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def save_pruned(model: nn.Module, tokenizer: Any, output_dir: str | os.PathLike, report: dict[str, Any]) -> Path:
    """Save model (safetensors), tokenizer (may be None) and ``pruning_report.json`` into ``output_dir``.

    Everything is written into a temporary directory next to ``output_dir`` and renamed at the end, so a failure
    never leaves a half-written output. A non-empty existing ``output_dir`` is refused.
    """
    with staged_output_dir(output_dir) as staging:
        model.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        with open(staging / REPORT_FILE, "w", encoding="utf-8") as handle:
            json.dump(_json_ready(report), handle, indent=2, sort_keys=False)
    return Path(output_dir).expanduser().resolve()


def summary_rows(report: dict[str, Any]) -> Iterable[tuple[str, str]]:
    """(label, value) rows of a short human summary of a pruning report (used by the CLI)."""
    if "method" in report:
        yield "method", str(report["method"])
    if report.get("pattern"):
        yield "pattern", str(report["pattern"])
    if report.get("sparsity_target") is not None:
        yield "target sparsity", f"{report['sparsity_target']:.4f}"
    if report.get("overall_sparsity") is not None:
        yield "achieved sparsity", f"{report['overall_sparsity']:.4f}"
    layers = report.get("layers") or {}
    if layers:
        values = list(layers.values())
        yield "per-projection range", f"{min(values):.4f} .. {max(values):.4f} ({len(values)} projections)"
    structured = report.get("structured")
    if structured:
        heads = structured["num_attention_heads"]
        yield "attention heads / layer", f"{heads['before']} -> {heads['after']}"
        kv = structured["num_key_value_heads"]
        yield "key/value heads / layer", f"{kv['before']} -> {kv['after']}"
        ffn = structured["intermediate_size"]
        yield "FFN channels / layer", f"{ffn['before']} -> {ffn['after']}"
        yield "parameters", f"{structured['parameters_before']:,} -> {structured['parameters_after']:,}"
    if report.get("seconds") is not None:
        yield "seconds", f"{report['seconds']:.1f}"
