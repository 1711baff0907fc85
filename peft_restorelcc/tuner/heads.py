"""Where the attention heads are, per architecture.

Every supported architecture feeds its attention output projection with the heads concatenated: head ``h`` of a
layer is the input slice ``[h * head_dim, (h + 1) * head_dim)`` of that projection. GQA does not change this (the
slices are query heads), and a structurally pruned layer simply has a narrower input.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D


@dataclass(frozen=True)
class Architecture:
    """What RestoreLCC needs to know about one transformers ``model_type``.

    ``output_projection``: suffix of the attention output projection, matched against the end of a module's dotted
    name. The parent (``self_attn.``, ``attn.``) is part of the suffix so that e.g. GPT-2's ``mlp.c_proj`` is never
    taken.
    ``output_bias``: whether that projection can carry a bias after a stock reload, which decides what a merged
    model (the compensation folded into the bias) looks like: ``"switch"`` means the config's ``attention_bias``
    turns it on (together with q/k/v biases), ``"always"`` means the architecture always builds one, ``"never"``
    means it is hard-coded off and no config can carry a merged compensation.
    """

    output_projection: str
    output_bias: str


_O_PROJ = "self_attn.o_proj"
# The one table of supported architectures (field notes, section 3). Everything else derives from it.
KNOWN_ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture(_O_PROJ, "switch"),
    "qwen2": Architecture(_O_PROJ, "never"),
    "qwen3": Architecture(_O_PROJ, "switch"),
    "mistral": Architecture(_O_PROJ, "never"),
    "mixtral": Architecture(_O_PROJ, "never"),
    "gemma": Architecture(_O_PROJ, "switch"),
    "gemma2": Architecture(_O_PROJ, "switch"),
    "gemma3": Architecture(_O_PROJ, "switch"),
    "gemma3_text": Architecture(_O_PROJ, "switch"),
    "phi3": Architecture(_O_PROJ, "never"),
    "olmo": Architecture(_O_PROJ, "switch"),
    "olmo2": Architecture(_O_PROJ, "switch"),
    "granite": Architecture(_O_PROJ, "switch"),
    "smollm3": Architecture(_O_PROJ, "switch"),
    "gpt_neox": Architecture("attention.dense", "switch"),
    "phi": Architecture("self_attn.dense", "always"),
    "opt": Architecture("self_attn.out_proj", "always"),
    "gpt2": Architecture("attn.c_proj", "always"),
}
DEFAULT_TARGET_MODULES: dict[str, str] = {name: arch.output_projection for name, arch in KNOWN_ARCHITECTURES.items()}


def model_types_with_output_bias(kind: str) -> frozenset[str]:
    """The model types whose output projection bias is ``kind`` (``"switch"``, ``"always"`` or ``"never"``)."""
    return frozenset(name for name, arch in KNOWN_ARCHITECTURES.items() if arch.output_bias == kind)


_LAYER_INDEX = re.compile(r"\.(\d+)(?:\.|$)")


@dataclass(frozen=True)
class HeadProjection:
    """One attention output projection and the head layout of its input."""

    name: str
    layer_index: int
    num_heads: int
    head_dim: int
    in_features: int
    out_features: int


def text_config(model_or_config):
    """The text part of a (possibly multimodal) config."""
    config = getattr(model_or_config, "config", model_or_config)
    getter = getattr(config, "get_text_config", None)
    return getter() if getter is not None else config


def head_dim_of(model_or_config) -> int:
    """``config.head_dim`` when the architecture sets one, else ``hidden_size // num_attention_heads``."""
    config = text_config(model_or_config)
    explicit = getattr(config, "head_dim", None)
    if isinstance(explicit, int) and explicit > 0:
        return explicit
    return int(config.hidden_size) // int(config.num_attention_heads)


def model_head_dim(model: nn.Module) -> int | None:
    """The head width the model's transformers config gives, or None for a model without one (a plain ``nn.Module``
    or a config lacking ``head_dim`` and ``hidden_size``/``num_attention_heads``)."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    try:
        return head_dim_of(config)
    except (AttributeError, TypeError, ValueError, ZeroDivisionError):
        return None


def default_target_module(model_or_config) -> str:
    """The attention output projection suffix for a known architecture, or a ValueError that says what to do."""
    config = getattr(model_or_config, "config", model_or_config)
    for candidate in (config, text_config(config)):
        model_type = getattr(candidate, "model_type", None)
        if model_type in DEFAULT_TARGET_MODULES:
            return DEFAULT_TARGET_MODULES[model_type]
    raise ValueError(
        f"No default attention output projection is known for model_type={getattr(config, 'model_type', None)!r}. "
        "Pass target_modules=[<suffix of the module that takes the concatenated heads as input>] explicitly, "
        f"e.g. 'self_attn.o_proj'. Known architectures: {sorted(DEFAULT_TARGET_MODULES)}."
    )


# Quantized Linear layers that RestoreLCC drives through their own forward (never reading their packed weight),
# by the module that defines them: the tuner imports no quantization library. bitsandbytes' Linear8bitLt and
# Linear4bit (NF4/FP4, with or without double quantization) are nn.Linear subclasses whose ``weight`` holds int8 or
# packed 4-bit data.
QUANTIZED_LINEAR_MODULES = ("bitsandbytes.",)


def compressed_tensors_scheme(module: nn.Module) -> Any:
    """The quantization scheme compressed-tensors (llm-compressor's format) attached to a Linear, else None. Such a
    layer keeps packed weights, or, once a forward has decompressed it, runs through compressed-tensors' own hooks."""
    return getattr(module, "quantization_scheme", None)


def is_dense_projection(module: nn.Module) -> bool:
    """A Linear or Conv1D whose ``weight`` is the plain floating-point matrix (not a quantized subclass)."""
    if isinstance(module, Conv1D):
        return True
    if not isinstance(module, nn.Linear) or compressed_tensors_scheme(module) is not None:
        return False
    weight = getattr(module, "weight", None)
    return (
        weight is not None
        and type(weight) in (torch.Tensor, nn.Parameter)
        and weight.dtype.is_floating_point
        and tuple(weight.shape) == (module.out_features, module.in_features)
    )


def is_quantized_projection(module: nn.Module) -> bool:
    """A quantized Linear of a supported library: its weight is never read as a matrix, the compensation goes through
    the layer's own forward (``layer(shift) - bias``)."""
    return isinstance(module, nn.Linear) and type(module).__module__.startswith(QUANTIZED_LINEAR_MODULES)


def is_projection(module: nn.Module) -> bool:
    return is_dense_projection(module) or is_quantized_projection(module)


def unsupported_projection_reason(module: nn.Module) -> str | None:
    """One line naming a target's layer type when RestoreLCC cannot wrap it, else None."""
    if is_projection(module):
        return None
    kind = f"{type(module).__module__}.{type(module).__name__}"
    if isinstance(module, nn.Linear) and compressed_tensors_scheme(module) is not None:
        return (
            f"{kind} is quantized by compressed-tensors (llm-compressor's format), which RestoreLCC does not wrap; "
            "load the checkpoint with quantization_config=transformers.CompressedTensorsConfig(dequantize=True) to "
            "restore it on its dequantized weights, or use bitsandbytes (load_in_4bit / load_in_8bit)."
        )
    if isinstance(module, nn.Linear):
        weight = getattr(module, "weight", None)
        stored = "no weight" if weight is None else f"weight {type(weight).__name__}, {weight.dtype}"
        return (
            f"{kind} ({stored}) is a quantized or otherwise "
            "non-dense Linear that RestoreLCC does not support; supported: nn.Linear, Conv1D, bitsandbytes "
            "Linear8bitLt/Linear4bit."
        )
    return (
        f"{kind} is not a supported output projection: RestoreLCC wraps nn.Linear, Conv1D or bitsandbytes "
        "Linear8bitLt/Linear4bit. Point target_modules at the attention output projection, e.g. 'self_attn.o_proj'."
    )


def projection_shape(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a Linear (dense or quantized) or a GPT-2 style Conv1D (weight in x out)."""
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1]
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    raise ValueError(unsupported_projection_reason(module))


def projection_weight(module: nn.Module) -> torch.Tensor:
    """The projection weight as ``out x in`` (a view; Conv1D is transposed). Dense projections only: a quantized
    layer's ``weight`` is packed data, not the matrix."""
    if isinstance(module, Conv1D):
        return module.weight.t()
    if is_dense_projection(module):
        return module.weight
    raise ValueError(
        f"{type(module).__name__} has no dense weight matrix to read (quantized); use its forward instead."
    )


def projection_device(module: nn.Module) -> torch.device:
    """Where a projection's weight lives (dense or quantized)."""
    return module.weight.device


def times_weight(module: nn.Module, vector: torch.Tensor) -> torch.Tensor:
    """``W @ vector`` for a quantized projection, through the layer's own forward: ``layer(vector) - bias``.

    The layer's kernel does the product (its own dequantization, whatever its storage), so no dense copy of the
    weight is made or kept. Gradients to ``vector`` flow through the layer's autograd, except where the layer has
    none (bitsandbytes' CPU 4-bit kernel after its repack, see ``_ThroughLayer``).
    """
    row = vector.reshape(1, -1)
    if _passes_no_gradient(module) and torch.is_grad_enabled() and vector.requires_grad:
        warnings.warn(
            "bitsandbytes repacked this 4-bit layer for the CPU on an eval forward, after which its kernel passes no "
            "gradient to its input: RestoreLCC's own gradient here is exact, but every gradient that must cross such "
            "a layer (from the layers above) is lost. Reload the model and train before any eval forward.",
            RuntimeWarning,
            stacklevel=2,
        )
        return _ThroughLayer.apply(row, module)[0]
    return _layer_without_bias(module, row)[0]


def _layer_without_bias(module: nn.Module, rows: torch.Tensor) -> torch.Tensor:
    """``rows @ W.T`` in fp32 through the layer's forward (the bias, if any, subtracted).

    Rows that carry no gradient go in flagged ``requires_grad`` under ``no_grad``: bitsandbytes' CPU backend
    repacks a 4-bit weight (rounding its absmax to bf16) on an eval forward of an input without that flag, and
    reading the compensation (a merge, an eval forward) must not change the quantization state.
    """
    if not rows.requires_grad:
        with torch.no_grad():
            output = module(rows.detach().requires_grad_(True)).float()
    else:
        output = module(rows).float()
    bias = module.bias
    return output if bias is None else output - bias.detach().float()


def _passes_no_gradient(module: nn.Module) -> bool:
    """bitsandbytes' CPU backend repacks a 4-bit weight on an eval forward without grad; its kernel then has no
    backward to the input."""
    quant_state = getattr(module.weight, "quant_state", None)
    return bool(getattr(quant_state, "packing_format_for_cpu", False))


class _ThroughLayer(torch.autograd.Function):
    """``rows @ W.T`` through a layer whose kernel has no backward: forward through the layer, backward
    ``grad @ W`` with ``W`` read out column by column through the same layer (``layer(I) - bias``), a transient
    ``in x out`` tensor per backward, freed at once."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, module: nn.Module) -> torch.Tensor:
        ctx.module = module
        ctx.in_features = rows.shape[-1]
        with torch.no_grad():
            return _layer_without_bias(module, rows)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        module = ctx.module
        with torch.no_grad():
            identity = torch.eye(ctx.in_features, device=grad.device, dtype=torch.float32)
            transposed = _layer_without_bias(module, identity)  # row i = W[:, i]
            return grad.float() @ transposed.T, None


def layer_index_of(module_name: str) -> int:
    """The decoder layer index in a module path such as ``model.layers.12.self_attn.o_proj``."""
    match = _LAYER_INDEX.search("." + module_name)
    if match is None:
        raise ValueError(f"Cannot find a layer index in module name {module_name!r}.")
    return int(match.group(1))


def layer_indices_of(module_names: list[str]) -> dict[str, int]:
    """Layer index of each target: the number in its dotted name (``model.layers.12.self_attn.o_proj`` -> 12) when
    every name has one, else its position among the targets in module order (models whose projections are named
    ``attn0``, ``attn1`` ... or that have a single one, as in PEFT's custom-model tests)."""
    if all(_LAYER_INDEX.search("." + name) for name in module_names):
        return {name: layer_index_of(name) for name in module_names}
    return {name: position for position, name in enumerate(module_names)}


def matches_target(module_name: str, target: str | list[str] | set[str]) -> bool:
    """PEFT's matching rule: a string is a full regex match, a list matches exact names or dotted suffixes."""
    if isinstance(target, str):
        return re.fullmatch(target, module_name) is not None
    return any(module_name == key or module_name.endswith("." + key) for key in target)


def find_head_projections(
    model: nn.Module,
    target_modules: str | list[str] | set[str] | None = None,
    head_dim: int | None = None,
) -> list[HeadProjection]:
    """All attention output projections of ``model``, ordered by layer, with their head layout.

    The number of heads of each layer comes from the projection's input width, so structurally pruned layers
    (fewer heads) are described correctly.
    """
    if target_modules is None:
        target_modules = [default_target_module(model)]
    if head_dim is None:
        head_dim = head_dim_of(model)
    matched = [(name, module) for name, module in model.named_modules() if matches_target(name, target_modules)]
    indices = layer_indices_of([name for name, _ in matched])
    found: list[HeadProjection] = []
    for name, module in matched:
        base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
        in_features, out_features = projection_shape(base)
        if in_features % head_dim != 0:
            raise ValueError(
                f"{name}: input width {in_features} is not divisible by head_dim={head_dim}. The target must be the "
                "projection fed by the concatenated heads; check target_modules and the config's head_dim."
            )
        found.append(
            HeadProjection(
                name=name,
                layer_index=indices[name],
                num_heads=in_features // head_dim,
                head_dim=head_dim,
                in_features=in_features,
                out_features=out_features,
            )
        )
    if not found:
        raise ValueError(
            f"No module of {type(model).__name__} matches target_modules={target_modules!r}. "
            "Pass the name (or dotted suffix) of the attention output projection."
        )
    found.sort(key=lambda projection: projection.layer_index)
    for first, second in zip(found, found[1:]):
        if first.layer_index == second.layer_index:
            # Heads are addressed by layer index (config.heads, calibration files): two projections per layer
            # would share every address.
            raise ValueError(
                f"target_modules={target_modules!r} matches more than one module in layer {first.layer_index} "
                f"({first.name}, {second.name}); RestoreLCC compensates the heads of one attention output projection "
                "per layer. Name it by a suffix that includes its parent, e.g. 'attn.c_proj' for GPT-2 (plain "
                "'c_proj' also matches the MLP)."
            )
    return found
