"""Inputs that cannot be trusted, caught before they are used: corrupt adapter files, non-finite weights, results that
would not be valid JSON. Every check raises ValueError with one line naming the file or tensor and the fix."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from ..tuner.config import PEFT_TYPE
from .compressed import sparse_format

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# Every tensor a RestoreLCC adapter saves has one of these in its name (tuner/layer.py's parameter names).
RESTORELCC_TENSOR_MARK = "restorelcc_"


def read_adapter_config(adapter: Path) -> dict[str, Any]:
    """``adapter_config.json`` parsed, or one line naming the file and what is wrong with it."""
    config_file = adapter / ADAPTER_CONFIG
    try:
        text = config_file.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{config_file} is not UTF-8 text: the adapter is corrupt; save it again.") from None
    if not text.strip():
        raise ValueError(f"{config_file} is empty: the adapter is incomplete; save it again (save_pretrained).")
    try:
        config = json.loads(text)
    except ValueError as error:
        raise ValueError(
            f"{config_file} is not valid JSON ({error}): the adapter is truncated or corrupt; save it again."
        ) from None
    if not isinstance(config, dict) or "peft_type" not in config:
        raise ValueError(f"{config_file} is not a PEFT adapter config (no peft_type): pass a PEFT adapter directory.")
    return config


def check_adapter_files(adapter: Path) -> dict[str, Any]:
    """Read the adapter's config and the header of its weights (cheap: no tensor data), and refuse, with one line,
    a corrupt/truncated config or safetensors file, and a RestoreLCC adapter whose weights hold none of its tensors
    (PEFT would load it with a warning and leave a random initialisation in place). Returns the config."""
    config = read_adapter_config(adapter)
    weights = adapter / ADAPTER_WEIGHTS
    if not weights.is_file():
        if (adapter / "adapter_model.bin").is_file():
            return config  # a legacy pickle adapter: PEFT reads it (weights_only) as it is
        raise ValueError(f"{adapter} has no {ADAPTER_WEIGHTS}: the adapter is incomplete; save it again.")
    keys = safetensors_keys(weights)
    if str(config.get("peft_type")) == PEFT_TYPE and not any(RESTORELCC_TENSOR_MARK in key for key in keys):
        raise ValueError(
            f"{weights} holds none of a RestoreLCC adapter's tensors (restorelcc_magnitude/bias/basis; it has "
            f"{len(keys)} others): it is not the adapter its config describes; save the adapter again."
        )
    return config


def safetensors_keys(path: Path) -> list[str]:
    """The tensor names of a safetensors file, checked to be complete (the header and the data it announces)."""
    from safetensors import SafetensorError, safe_open

    size = path.stat().st_size
    try:
        with open(path, "rb") as handle:
            header_size = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(header_size)) if 8 + header_size <= size else None
    except (OSError, ValueError, UnicodeDecodeError):
        header = None
    if header is None:
        raise ValueError(f"{path} is truncated or corrupt (unreadable safetensors header): save the file again.")
    ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
    if 8 + header_size + max(ends, default=0) > size:
        raise ValueError(
            f"{path} is truncated ({size} bytes, its header announces {8 + header_size + max(ends)}): save it again."
        )
    try:
        with safe_open(str(path), framework="pt") as handle:
            return list(handle.keys())
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"{path} is not a valid safetensors file ({error}): save it again.") from None


def check_finite_weights(model: Any, what: str) -> None:
    """Refuse a model (or PEFT model) with NaN/inf in any parameter or buffer, naming the first such tensor."""
    import torch

    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and tensor.numel() and not bool(torch.isfinite(tensor).all()):
            count = int((~torch.isfinite(tensor)).sum())
            raise ValueError(
                f"{what} has {count} non-finite (NaN/inf) values in {name}: its results cannot be trusted. Recreate "
                "it from a sound checkpoint (or load it in float32 with --dtype float32)."
            )


def json_safe(value: Any) -> Any:
    """``value`` with every NaN/inf float replaced by None, so that the JSON written is valid (no NaN tokens)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def write_json_atomic(path: str | os.PathLike, data: Any) -> Path:
    """Write ``data`` as strict JSON (NaN/inf as null) to a temporary sibling and rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(json_safe(data), indent=2, allow_nan=False) + "\n"
    staging = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        staging.write_text(text)
        os.replace(staging, path)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
    return path


def decoder_weight_zeros(model_dir: Path) -> int | None:
    """Zero entries in the 2-D weights of a saved model's decoder layers (names with ``layers.``/``.h.``), read
    tensor by tensor from its safetensors files; None when that cannot be told (no plain floating-point weights: a
    sparse or quantized format, or another file format)."""
    from safetensors import safe_open


    files = sorted(Path(model_dir).glob("*.safetensors"))
    config_file = Path(model_dir) / "config.json"
    try:
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    except (OSError, ValueError):
        config = {}
    if not files or sparse_format(Path(model_dir)) is not None or config.get("quantization_config"):
        return None  # a sparse or quantized format stores no plain zeros to count: unknown, not "unpruned"
    zeros, seen = 0, 0
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                if not key.endswith(".weight") or not any(part in key for part in ("layers.", ".h.", "layer.")):
                    continue
                tensor = handle.get_tensor(key)
                if tensor.dim() == 2 and tensor.is_floating_point():
                    seen += 1
                    zeros += int((tensor == 0).sum())
                    if zeros:
                        return zeros
    return zeros if seen else None
