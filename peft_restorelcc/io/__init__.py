"""Models and adapters in and out: embedded names, local directories and Hub ids (with a revision)."""

from __future__ import annotations

from .. import lazy_face

# Each name loads its module on first use (see ``lazy_face``).
__getattr__, __all__ = lazy_face(
    __name__,
    {
        ".adapters": ("BASE_RECORD", "check_adapter_base", "record_base", "resolve_adapter_path", "write_base_record"),
        ".choices": ("QUANTIZATIONS",),
        ".hub": ("download_snapshot", "is_hub_id"),
        ".models": (
            "bitsandbytes_config",
            "load_model",
            "load_model_and_tokenizer",
            "load_tokenizer",
            "model_loader",
            "model_reference",
            "name_model_source",
            "resolve_model_path",
        ),
    },
)
