"""Models and adapters in and out: embedded names, local directories and Hub ids (with a revision)."""

from .adapters import BASE_RECORD, check_adapter_base, record_base, resolve_adapter_path, write_base_record
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
    "write_base_record",
    "check_adapter_base",
    "BASE_RECORD",
    "resolve_adapter_path",
    "resolve_model_path",
]
