"""Pruned models in compressed-tensors' sparse formats: ``sparse-bitmask`` and ``sparse-24-bitmask``, read (legacy input).

llm-compressor saved pruned models this way: ``config.json`` carries ``quantization_config = {"quant_method":
"compressed-tensors", "sparsity_config": {"format": ..., "targets", "ignore", "sparsity_structure", ...}}`` and every
targeted Linear's ``weight`` is replaced in the safetensors by

* ``sparse-bitmask``: ``<module>.compressed`` (the non-zeros, row-major, 1-D), ``<module>.bitmask`` (uint8, rows x
  ceil(cols / 8), little bit order), ``<module>.row_offsets`` (where each row starts in ``compressed``) and
  ``<module>.shape``;
* ``sparse-24-bitmask``: ``<module>.compressed`` (rows x cols / 2: the two kept values of every group of four),
  ``<module>.bitmask`` and ``<module>.shape`` (2 x 1).

compressed-tensors 0.15 dropped these compressors, and stock transformers 5 with compressed-tensors >= 0.15 then
loads such a checkpoint with its sparse weights MISSING (randomly initialised, a warning table only). So the
checkpoint is decompressed here, exactly (every stored value bit for bit, every other weight zero), with the bit
packing of the installed compressed-tensors package (``pack_bitmasks`` / ``unpack_bitmasks``), and the model is
built by ``from_pretrained(None, config=..., state_dict=...)``, which keeps dtype and ``device_map`` handling.

Nothing here writes these formats any more: compressed-tensors 0.15, llm-compressor 0.11 and vLLM dropped them, and
vLLM 0.24+ refuses a config with a ``sparsity_config``. Merged models are written as plain safetensors with the zeros
stored (``export.save_merged``), which is what transformers and vLLM load.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

BITMASK = "sparse-bitmask"
SPARSE24 = "sparse-24-bitmask"
SPARSE_FORMATS = (BITMASK, SPARSE24)
INSTALL_HINT = "pip install 'peft_restorelcc[compressed]' (or: pip install 'compressed-tensors>=0.15')"


def _compressed_tensors() -> Any:
    try:
        import compressed_tensors
        from compressed_tensors import utils
    except ImportError as error:
        raise ImportError(
            f"Reading or writing compressed-tensors models needs compressed-tensors: {INSTALL_HINT}."
        ) from error
    return compressed_tensors, utils


def _quantization_config(model_dir: str | os.PathLike) -> dict[str, Any]:
    config_file = Path(model_dir) / "config.json"
    if not config_file.is_file():
        return {}
    return json.loads(config_file.read_text()).get("quantization_config") or {}


def sparse_format(model_dir: str | os.PathLike) -> str | None:
    """``"sparse-bitmask"`` / ``"sparse-24-bitmask"`` for a sparse compressed-tensors checkpoint, else None.

    A compressed-tensors checkpoint that is quantized, or in a sparse format this module does not know, is refused
    with a ValueError: loading it as a plain model would silently drop its weights."""
    quantization = _quantization_config(model_dir)
    if quantization.get("quant_method") != "compressed-tensors":
        return None
    if quantization.get("config_groups"):
        raise ValueError(
            f"{model_dir} is a quantized compressed-tensors checkpoint: here RestoreLCC needs the pruned model's "
            "weights in bf16/fp16/fp32 (`restorelcc train` and `merge` load it dequantized themselves; in Python: "
            "load_model(..., dequantize=True)), or save the pruned model without quantization."
        )
    fmt = (quantization.get("sparsity_config") or {}).get("format", "dense")
    if fmt == "dense":
        return None  # plain dense weights: transformers loads them as they are
    if fmt not in SPARSE_FORMATS:
        raise ValueError(
            f"{model_dir}: compressed-tensors sparsity format {fmt!r} is not supported; supported: "
            f"{', '.join(SPARSE_FORMATS)} (and dense)."
        )
    return fmt


def _weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / name for name in names]
    single = model_dir / "model.safetensors"
    if not single.is_file():
        raise ValueError(f"{model_dir} has no model.safetensors (or index): not a compressed-tensors checkpoint.")
    return [single]


def decompress_weight(fmt: str, parts: dict[str, torch.Tensor], name: str = "weight") -> torch.Tensor:
    """The dense weight of one module from its stored parts (``compressed``, ``bitmask``, ``shape``, ...)."""
    _, utils = _compressed_tensors()
    missing = {"compressed", "bitmask", "shape"} - set(parts)
    if missing:
        raise ValueError(f"{name}: the {fmt} parts {sorted(missing)} are missing from the checkpoint.")
    shape = [int(v) for v in parts["shape"].flatten().tolist()]
    mask = utils.unpack_bitmasks(parts["bitmask"], shape)
    values = parts["compressed"].flatten()
    if fmt == BITMASK:
        # row_offsets is redundant with the mask; a mismatch means a corrupt file, not something to guess around.
        counts = mask.sum(dim=-1)
        if "row_offsets" in parts and not torch.equal(parts["row_offsets"].flatten(), counts.cumsum(0) - counts):
            raise ValueError(f"{name}: row_offsets disagree with the bitmask; the checkpoint is corrupt.")
    if int(mask.sum()) != values.numel():
        raise ValueError(
            f"{name}: the bitmask marks {int(mask.sum())} values but {values.numel()} are stored; the checkpoint is "
            "corrupt."
        )
    dense = torch.zeros(shape, dtype=values.dtype)
    dense[mask] = values
    return dense


def read_state_dict(model_dir: str | os.PathLike, fmt: str | None = None) -> dict[str, torch.Tensor]:
    """The dense state dict of a sparse compressed-tensors checkpoint (CPU tensors, stored dtype)."""
    model_dir = Path(model_dir)
    fmt = fmt or sparse_format(model_dir)
    if fmt not in SPARSE_FORMATS:
        raise ValueError(f"{model_dir} is not a sparse compressed-tensors checkpoint.")
    suffixes = ("compressed", "bitmask", "shape", "row_offsets")
    state: dict[str, torch.Tensor] = {}
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for path in _weight_files(model_dir):
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                prefix, _, suffix = key.rpartition(".")
                if suffix in suffixes:
                    grouped.setdefault(prefix, {})[suffix] = handle.get_tensor(key)
                else:
                    state[key] = handle.get_tensor(key)
    for prefix, parts in grouped.items():
        if "bitmask" not in parts:  # an ordinary tensor that happens to end in one of the names
            state.update({f"{prefix}.{suffix}": value for suffix, value in parts.items()})
            continue
        state[f"{prefix}.weight"] = decompress_weight(fmt, parts, prefix)
    return state


def load_sparse_model(
    model_dir: str | os.PathLike, dtype: torch.dtype | str | None = None, device_map: Any = None
) -> nn.Module:
    """A causal LM from a sparse compressed-tensors checkpoint, its weights decompressed exactly, in eval mode.

    ``dtype=None`` keeps the stored dtype. The config loses its ``quantization_config`` (the model is now plain)."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    model_dir = Path(model_dir)
    fmt = sparse_format(model_dir)
    state = read_state_dict(model_dir, fmt)
    config = AutoConfig.from_pretrained(model_dir)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    if dtype is None:
        dtype = next(value.dtype for key, value in state.items() if key.endswith(".weight"))
    # The concrete class: the Auto factory needs a path, and the weights come from memory here.
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    model = model_class.from_pretrained(None, config=config, state_dict=state, dtype=dtype, device_map=device_map)
    model.config._name_or_path = str(model_dir)
    return model.eval()


def is_sparsity_only(quantization_config: Any) -> bool:
    """A compressed-tensors ``quantization_config`` that only describes how zeros were stored (no quantized weights)."""
    if quantization_config is None:
        return False
    fields = quantization_config if isinstance(quantization_config, dict) else quantization_config.to_dict()
    return fields.get("quant_method") == "compressed-tensors" and not fields.get("config_groups")
