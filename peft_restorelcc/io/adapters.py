"""Adapters as users name them: a local directory, or a Hub id at a revision (local first, as for models)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..tuner.fingerprint import FINGERPRINT_METHOD, weights_fingerprint
from .checks import check_adapter_files
from .hub import download_snapshot, is_hub_id

ADAPTER_CONFIG = "adapter_config.json"


def resolve_adapter_path(name_or_path: str | os.PathLike, revision: str | None = None, flag: str = "--adapter") -> Path:
    """A local adapter directory (holding ``adapter_config.json``): an existing path as it is, else a Hub id
    ``org/name`` fetched into the user's Hugging Face cache at ``revision``. ValueError with one line otherwise, and
    for a corrupt or truncated adapter_config.json / adapter_model.safetensors (``integrity.check_adapter_files``)."""
    path = Path(name_or_path).expanduser()
    if not path.exists() and is_hub_id(str(name_or_path)):
        try:
            path = download_snapshot(str(name_or_path), revision)
        except ValueError as error:  # a mistyped relative path looks like org/name: say both
            raise ValueError(f"{flag} {name_or_path}: no such local directory, and as a Hub id: {error}") from None
    if not (path / ADAPTER_CONFIG).is_file():
        raise ValueError(
            f"{flag} {name_or_path} is not an adapter directory (no {ADAPTER_CONFIG}) nor a Hub id (org/name): pass "
            "the directory written by `restorelcc calibrate` or by a PEFT model's save_pretrained."
        )

    check_adapter_files(path)  # a corrupt or truncated file is one line here, not a traceback at load time
    return path


def load_adapter(base, adapter: str | os.PathLike, flag: str = "--adapter", **kwargs):
    """``PeftModel.from_pretrained(base, adapter, **kwargs)`` with a tensor that does not fit the base (wrong shape)
    reported as one ValueError line naming the adapter and the first mismatch, not torch's multi-line error."""
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(base, str(adapter), **kwargs)
    except RuntimeError as error:
        details = [line.strip() for line in str(error).splitlines()[1:] if line.strip()]
        if "size mismatch" not in str(error) and "Error(s) in loading state_dict" not in str(error):
            raise
        first = details[0] if details else str(error).splitlines()[0]
        more = f" (and {len(details) - 1} more)" if len(details) > 1 else ""
        raise ValueError(
            f"{flag} {adapter} does not fit this base model: {first}{more}. Load it onto the model it was made for, "
            "or save the adapter again."
        ) from None


BASE_RECORD = "restorelcc_base.json"


def record_base(
    peft_model: Any, reference: str, revision: str | None = None, local_dir: str | os.PathLike | None = None
) -> str | None:
    """Name ``reference`` (at ``revision``) as the base of every adapter of ``peft_model``: what
    ``AutoPeftModelForCausalLM`` loads under the adapter once it is saved. For an adapter trained on another model
    than the one it was made on (``restorelcc train --model``), the model it was trained on. The weights'
    fingerprint (of ``local_dir``, else of ``reference`` when that is a directory) goes with it: into a RestoreLCC
    config's ``base_model_fingerprint`` and, for every type, into ``restorelcc_base.json`` by ``write_base_record``.
    Returns the fingerprint (None where the weights are not safetensors files on this machine)."""
    fingerprint = weights_fingerprint(local_dir if local_dir is not None else reference)
    for config in getattr(peft_model, "peft_config", {}).values():  # a plain model (full fine-tuning) has none
        config.base_model_name_or_path = str(reference)
        config.revision = None if Path(reference).is_dir() else revision  # a revision names a Hub commit only
        config.base_model_fingerprint = fingerprint  # a field of RestoreLCCConfig; on other types read by us only
    return fingerprint


def write_base_record(adapter_dir: str | os.PathLike, peft_model: Any) -> Path | None:
    """``restorelcc_base.json`` beside a saved adapter: the base it names, its revision and weights fingerprint, as
    ``record_base`` set them; nothing when no fingerprint was recorded."""
    configs = getattr(peft_model, "peft_config", {})
    config = configs.get("default") or next(iter(configs.values()), None)
    fingerprint = getattr(config, "base_model_fingerprint", None)
    if not fingerprint:
        return None
    record = {"base_model_name_or_path": config.base_model_name_or_path, "revision": config.revision,
              "fingerprint": fingerprint, "fingerprint_method": FINGERPRINT_METHOD}  # fmt: skip
    path = Path(adapter_dir) / BASE_RECORD
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def check_adapter_base(
    adapter_dir: str | os.PathLike, model_dir: str | os.PathLike, model_label: str, force: bool = False
) -> None:
    """Refuse (one ValueError line) an adapter whose recorded base has other weights than ``model_dir``, unless
    ``force``. Adapters without a record (written before it, or by other tools) pass, as before."""
    path = Path(adapter_dir) / BASE_RECORD
    if force or not path.is_file():
        return
    recorded = json.loads(path.read_text())
    current = weights_fingerprint(model_dir)
    if current is None or current == recorded.get("fingerprint"):
        return
    raise ValueError(
        f"--adapter {adapter_dir} was made on {recorded.get('base_model_name_or_path')} (weights "
        f"{str(recorded.get('fingerprint'))[:19]}), but --model {model_label} has other weights ({current[:19]}): "
        "pass the model it was made on, or add --force to use it anyway."
    )
