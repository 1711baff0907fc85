"""Pruning reports, calibration windows and saving a pruned model."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..io.files import staged_output_dir, state_bytes
from ..io.models import name_model_source
from .common import REPORT_FILE


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


def save_pruned(
    model: nn.Module,
    tokenizer: Any,
    output_dir: str | os.PathLike,
    report: dict[str, Any],
    pruned_from: str | None = None,
) -> Path:
    """Save model (safetensors), tokenizer (may be None) and ``pruning_report.json`` into ``output_dir``.

    Everything is written into a temporary directory next to ``output_dir`` and renamed at the end, so a failure
    never leaves a half-written output. A non-empty existing ``output_dir`` is refused.

    The saved config records the model it was pruned from in ``pruned_from`` (``pruned_from``, else the model's own
    earlier record, else the directory or Hub id it was loaded from). Once saved, ``model`` names ``output_dir`` as
    its source, so an adapter built on it afterwards names the pruned model as its base, not the dense one.
    """
    source = pruned_from or getattr(model.config, "pruned_from", None) or getattr(model, "name_or_path", "") or None
    model.config.pruned_from = source
    with staged_output_dir(output_dir, expected_bytes=state_bytes(model)) as staging:
        model.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        with open(staging / REPORT_FILE, "w", encoding="utf-8") as handle:
            json.dump(_json_ready(report), handle, indent=2, sort_keys=False)
    saved = Path(output_dir).expanduser().resolve()
    name_model_source(model, saved)
    return saved


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
