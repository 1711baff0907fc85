"""Models and adapters in and out: embedded names, local directories and Hub ids (with a revision)."""

from .adapters import record_base, resolve_adapter_path
from .hub import download_snapshot, is_hub_id
from .models import (
    QUANTIZATIONS,
    bitsandbytes_config,
    load_model,
    load_model_and_tokenizer,
    load_tokenizer,
    model_loader,
    model_reference,
    name_model_source,
    resolve_model_path,
)

__all__ = [
    "QUANTIZATIONS",
    "bitsandbytes_config",
    "download_snapshot",
    "is_hub_id",
    "load_model",
    "load_model_and_tokenizer",
    "load_tokenizer",
    "model_loader",
    "model_reference",
    "name_model_source",
    "record_base",
    "resolve_adapter_path",
    "resolve_model_path",
]
