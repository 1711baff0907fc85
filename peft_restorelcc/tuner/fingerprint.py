"""A fingerprint of a saved model's weights, cheap enough for a 70B checkpoint: never a full read.

It hashes every safetensors file's header (names, dtypes, shapes, offsets) and a fixed sample of each tensor's bytes
(``SAMPLES`` windows of ``SAMPLE_BYTES`` spread over the tensor, its first and last bytes included): two prunings of
one model, or a pruned model and its dense original, differ there; a copy or a re-save of the same weights does not.
An adapter records the fingerprint of the model it was made on, so that it is not merged onto another one of the
same shape without a word. Standard library only: the tuner stays copyable into PEFT as it is.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

SAMPLES = 4
SAMPLE_BYTES = 256
FINGERPRINT_METHOD = f"sha256 over safetensors headers and {SAMPLES} x {SAMPLE_BYTES} bytes per tensor (v1)"


def weights_fingerprint(model_dir: str | os.PathLike) -> str | None:
    """``sha256:<hex>`` of the safetensors weights in ``model_dir``; None where there are none to read (another
    format, a Hub id that is not a local directory)."""
    directory = Path(model_dir)
    files = sorted(directory.glob("*.safetensors")) if directory.is_dir() else []
    if not files:
        return None
    digest = hashlib.sha256()
    for path in files:
        with open(path, "rb") as handle:
            header_size = int.from_bytes(handle.read(8), "little")
            header = handle.read(header_size)
            digest.update(path.name.encode() + b"\0" + header)
            entries = json.loads(header)
            for name in sorted(key for key in entries if key != "__metadata__"):
                begin, end = entries[name]["data_offsets"]
                for offset in _sample_offsets(begin, end):
                    handle.seek(8 + header_size + offset)
                    digest.update(handle.read(min(SAMPLE_BYTES, end - offset)))
    return "sha256:" + digest.hexdigest()


def _sample_offsets(begin: int, end: int) -> list[int]:
    """Where the windows of a tensor stored at ``[begin, end)`` start: evenly spread, the first at ``begin`` and the
    last ending at ``end``."""
    span = max(0, end - begin - SAMPLE_BYTES)
    return sorted({begin + span * index // (SAMPLES - 1) for index in range(SAMPLES)})
