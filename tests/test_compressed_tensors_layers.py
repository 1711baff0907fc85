"""A real compressed-tensors (llm-compressor's format) W4A16 checkpoint: refused in one line that names the fix, before
and after its first forward; loaded dequantized, it restores and merges like any dense model.

The checkpoint is built with compressed-tensors' own API (compressed_tensors_models.save_w4a16).
"""

from __future__ import annotations

import pytest
import torch

ct = pytest.importorskip("compressed_tensors")

from compressed_tensors_models import save_w4a16  # noqa: E402
from peft import get_peft_model  # noqa: E402
from tiny_models import random_input_ids  # noqa: E402
from transformers import AutoModelForCausalLM, CompressedTensorsConfig  # noqa: E402

import peft_restorelcc  # noqa: E402

HEADS = {0: [1, 2], 1: [0, 3]}


@pytest.fixture(scope="module")
def w4a16_dir(tmp_path_factory):
    return save_w4a16(tmp_path_factory.mktemp("w4a16"))


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
