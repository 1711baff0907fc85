"""Devices: the one the user asked for (``--device``, ``--device-map``) and where a model's inputs go."""

from __future__ import annotations

import json

import torch
from torch import nn


def input_device(model: nn.Module) -> torch.device:
    """The device of the input embeddings (under a ``device_map`` the model is split, and only the embeddings'
    device takes token ids); the first parameter's device when a model has no embeddings; the CPU for a model on
    the meta device (an offloaded one is fed from the CPU by accelerate's hooks)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        embeddings = base.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        embeddings = None
    if embeddings is not None:
        device = embeddings.weight.device
    else:
        first = next(base.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
    return torch.device("cpu") if device.type == "meta" else device


def default_device(requested: str | None = None) -> torch.device:
    """``requested`` if given, else the GPU where there is one (CUDA, then Apple MPS), else the CPU."""
    if requested:
        try:
            return torch.device(requested)
        except RuntimeError as error:
            raise ValueError(f"unknown device {requested!r} ({error}); use cpu, cuda, cuda:N or mps.") from None
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def parse_device_map(text: str | None) -> str | dict | None:
    """``--device-map`` of the CLI: ``auto`` / ``balanced`` / ``balanced_low_0`` / ``sequential`` (accelerate splits
    the model over the GPUs and offloads what does not fit to CPU, then disk), a device (``cpu``, ``cuda:1``: the
    whole model there), or a JSON object ``{"module name": device, ...}`` (devices, ``"cpu"`` or ``"disk"``)."""
    if text is None:
        return None
    text = text.strip()
    if text.startswith("{"):
        try:
            mapping = json.loads(text)
        except ValueError as error:
            raise ValueError(f"--device-map {text!r} is not valid JSON: {error}") from None
        if not isinstance(mapping, dict):
            raise ValueError(f"--device-map {text!r} must be a JSON object of module name -> device.")
        return mapping
    if text in ("auto", "balanced", "balanced_low_0", "sequential"):
        return text
    return {"": str(default_device(text))}
