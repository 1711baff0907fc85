"""Real compressed-tensors (llm-compressor's format) W4A16 checkpoints of tiny models, for the tests that need one.

llm-compressor itself is not installed (it requires an older transformers); the checkpoint is built with
compressed-tensors' own API, as llm-compressor's `oneshot` writes it: pack-quantized int4 weights in groups of 128,
scales from a min-max observer, lm_head left unquantized.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tiny_models import make_tiny_model


def save_w4a16(directory: Path, model_type: str = "llama") -> Path:
    """A tiny ``model_type`` model (hidden 256: group size 128 divides every input) quantized W4A16 into
    ``directory``; needs compressed-tensors."""
    from compressed_tensors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationConfig,
        QuantizationStatus,
        apply_quantization_config,
        preset_name_to_scheme,
    )
    from compressed_tensors.quantization.utils import calculate_qparams

    torch.manual_seed(0)
    model = make_tiny_model(model_type, hidden_size=256, intermediate_size=512)
    scheme = preset_name_to_scheme("W4A16", ["Linear"])
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"]))
    for module in model.modules():
        weights = getattr(getattr(module, "quantization_scheme", None), "weights", None)
        if weights is None:
            continue
        groups = module.weight.detach().reshape(module.weight.shape[0], -1, weights.group_size)
        scale, zero_point = calculate_qparams(groups.amin(-1), groups.amax(-1), weights)  # a min-max observer's
        module.weight_scale.data.copy_(scale.reshape(module.weight_scale.shape))
        if hasattr(module, "weight_zero_point"):
            module.weight_zero_point.data.copy_(zero_point.reshape(module.weight_zero_point.shape))
        module.quantization_status = QuantizationStatus.CALIBRATION
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="pack-quantized")
    compressor.compress_model(model)
    directory = Path(directory)
    model.save_pretrained(directory)
    compressor.update_config(directory)
    return directory
