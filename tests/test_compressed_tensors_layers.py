"""A real compressed-tensors (llm-compressor's format) W4A16 checkpoint: refused in one line that names the fix, before
and after its first forward; loaded dequantized, it restores and merges like any dense model.

llm-compressor itself is not installed (it requires an older transformers); the checkpoint is built with
compressed-tensors' own API, as llm-compressor's `oneshot` writes it: pack-quantized int4 weights in groups of 128.
"""

from __future__ import annotations

import pytest
import torch

ct = pytest.importorskip("compressed_tensors")

from peft import get_peft_model  # noqa: E402
from tiny_models import make_tiny_model, random_input_ids  # noqa: E402
from transformers import AutoModelForCausalLM, CompressedTensorsConfig  # noqa: E402

import peft_restorelcc  # noqa: E402

HEADS = {0: [1, 2], 1: [0, 3]}


@pytest.fixture(scope="module")
def w4a16_dir(tmp_path_factory):
    from compressed_tensors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationConfig,
        QuantizationStatus,
        apply_quantization_config,
        preset_name_to_scheme,
    )
    from compressed_tensors.quantization.utils import calculate_qparams

    torch.manual_seed(0)
    model = make_tiny_model("llama", hidden_size=256, intermediate_size=512)  # group size 128 divides every input
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
    directory = tmp_path_factory.mktemp("w4a16")
    model.save_pretrained(directory)
    compressor.update_config(directory)
    return directory


def config():
    return peft_restorelcc.RestoreLCCConfig(heads=HEADS, init_weights="gaussian", init_std=0.1, task_type="CAUSAL_LM")


def test_a_w4a16_model_is_refused_before_and_after_its_first_forward(w4a16_dir):
    model = AutoModelForCausalLM.from_pretrained(w4a16_dir, device_map="cpu")
    for stage in ("as loaded", "after a forward"):  # the first forward decompresses the packed weights in place
        with pytest.raises(ValueError) as raised:
            get_peft_model(model, config())
        message = str(raised.value)
        assert "\n" not in message, stage
        assert "compressed-tensors" in message and "CompressedTensorsConfig(dequantize=True)" in message, stage
        assert not any("restorelcc" in type(module).__module__ for module in model.modules()), stage
        with torch.no_grad():
            model(random_input_ids(1, 8))


def test_a_w4a16_model_loaded_dequantized_restores_and_merges(w4a16_dir):
    quantization = CompressedTensorsConfig(dequantize=True)
    model = AutoModelForCausalLM.from_pretrained(w4a16_dir, device_map="cpu", quantization_config=quantization)
    adapted = get_peft_model(model, config()).eval()
    ids = random_input_ids(2, 12)
    with torch.no_grad():
        unmerged = adapted(ids).logits
        merged = adapted.merge_and_unload()(ids).logits
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)
