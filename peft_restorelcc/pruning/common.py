"""What every pruner shares: validation, finding the decoder blocks and their projections, masks, sparsity, and
reading/writing weights of models dispatched by accelerate (also offloaded ones)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..tuner.heads import text_config

REPORT_FILE = "pruning_report.json"

# ----------------------------------------------------------------------------------------------------------------
# Validation helpers
# ----------------------------------------------------------------------------------------------------------------


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
