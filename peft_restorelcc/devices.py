"""Where a model's inputs go: the one rule used by calibration, evaluation and training helpers."""

from __future__ import annotations

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
