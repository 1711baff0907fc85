"""Merged models from quantized bases in the real vLLM engine (CPU build, its own venv; see benchmarks/serving_vllm.py).
Skipped where /work/vllm-venv (or $RESTORELCC_VLLM_PYTHON) is missing. Each vLLM start takes 10-60 s on 2 CPU cores.

Measured with vllm-cpu 0.32.0 (issue 39, item 5):

* bitsandbytes (NF4, int8): refused at config validation, ``Unknown quantization method: bitsandbytes`` (vLLM 0.32's
  quantization registry has no bitsandbytes method at all). The test accepts that refusal, or, should a later vLLM
  load the checkpoint, requires its log-probs to equal the unmerged adapter's.
* compressed-tensors W4A16 (pack-quantized int4, groups of 128): loads and generates, in bfloat16 only (the CPU
  kernel, CPUWNA16LinearKernel, fails in float32: ``"cpu_gemm_wna16" not implemented for 'Float'``). RestoreLCC refuses
  those layers, so the model is restored on the dequantized weights (``CompressedTensorsConfig(dequantize=True)``); the
  merge only writes q/k/v/o biases, and ``export.save_merged_packed`` writes them next to the packed W4A16 weights
  (kept bit for bit); vLLM serves that with the unmerged adapter's log-probs to bfloat16 precision (measured 3e-3;
  the compensation itself moves them by 0.9).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
import torch
from benchmark_scripts import load_benchmark
from peft import get_peft_model
from safetensors.torch import load_file
from tiny_models import make_tiny_model
from transformers import AutoModelForCausalLM

from peft_restorelcc import RestoreLCCConfig
from peft_restorelcc.io.export import changed_checkpoint_tensors, save_merged, save_merged_packed

VLLM_PYTHON = os.environ.get("RESTORELCC_VLLM_PYTHON", "/work/vllm-venv/bin/python")
pytestmark = pytest.mark.skipif(not Path(VLLM_PYTHON).exists(), reason=f"no vLLM venv at {VLLM_PYTHON}")

try:  # the real W4A16 checkpoint that test_compressed_tensors_layers builds with compressed-tensors' own API
    import compressed_tensors  # noqa: F401
    from test_compressed_tensors_layers import w4a16_dir  # noqa: F401 (a fixture)
except ImportError:

    @pytest.fixture
    def w4a16_dir():
        pytest.skip("compressed-tensors is not installed")


serving = load_benchmark("serving_vllm")
# bfloat16 serving of the W4A16 checkpoint vs the float32 adapter in transformers. Measured: 3.1e-3 (and 5.5e-3 for
# the W4A16 model without adapter against transformers' own decompressed forward); the compensation moves them by 0.93.
BF16_TOLERANCE = 2e-2


def prompts(vocab_size: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(3, vocab_size, (length,), generator=generator).tolist() for length in (12, 40)]


def restorelcc(model, heads):
    torch.manual_seed(1)
    config = RestoreLCCConfig(init_weights="gaussian", heads=heads, init_std=1.0, task_type="CAUSAL_LM")
    return get_peft_model(model, config).eval()


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_bitsandbytes_merge_is_refused_by_vllm_cpu_or_served_exactly(fmt, tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    quantization = (
        BitsAndBytesConfig(load_in_8bit=True)
        if fmt == "int8"
        else BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    )
    # head_dim 32 (vLLM's CPU attention refuses 16), hidden 128 (bitsandbytes' 4-bit blocks are 64 wide).
    make_tiny_model("llama", hidden_size=128, intermediate_size=256).save_pretrained(tmp_path / "base")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")
        base = AutoModelForCausalLM.from_pretrained(
            tmp_path / "base", quantization_config=quantization, device_map="cpu", dtype=torch.float32
        )
        adapter = restorelcc(base, serving.HEADS)
        ids = prompts(base.config.vocab_size)
        expected = serving.prompt_logprobs(adapter, ids)
        save_merged(adapter, tmp_path / fmt)
    saved = json.loads((tmp_path / fmt / "config.json").read_text())
    assert saved["quantization_config"]["quant_method"] == "bitsandbytes"
    try:
        served = serving.run_vllm(
            VLLM_PYTHON, tmp_path / fmt, ids, tmp_path, max_model_len=base.config.max_position_embeddings
        )
    except RuntimeError as error:
        assert "Unknown quantization method: bitsandbytes" in str(error), str(error)[-2000:]
        return
    assert serving.max_difference(served["logprobs"], expected) <= BF16_TOLERANCE


def test_w4a16_checkpoint_serves_with_the_merged_biases(w4a16_dir, tmp_path):
    from transformers import CompressedTensorsConfig

    model = AutoModelForCausalLM.from_pretrained(
        w4a16_dir, device_map="cpu", quantization_config=CompressedTensorsConfig(dequantize=True)
    )
    adapter = restorelcc(model, {0: [1, 2], 1: [0, 3]})
    ids = prompts(model.config.vocab_size)
    expected = serving.prompt_logprobs(adapter, ids)
    with adapter.disable_adapter():
        uncompensated = serving.prompt_logprobs(adapter, ids)
    # The package route (restorelcc merge does the same): the checkpoint's packed W4A16 tensors bit for bit, the
    # merged q/k/v/o biases beside them, attention_bias=True and the original quantization_config.
    served_dir = save_merged_packed(adapter, w4a16_dir, tmp_path / "w4a16-merged")
    assert changed_checkpoint_tensors(w4a16_dir, served_dir) == []
    packed = load_file(served_dir / "model.safetensors")
    assert any(name.endswith("weight_packed") for name in packed)
    assert any(name.endswith("o_proj.bias") and tensor.abs().max() > 0 for name, tensor in packed.items())

    served = serving.run_vllm(
        VLLM_PYTHON, served_dir, ids, tmp_path, dtype="bfloat16", max_model_len=model.config.max_position_embeddings
    )
    difference = serving.max_difference(served["logprobs"], expected)
    control = serving.max_difference(uncompensated, expected)
    assert difference <= BF16_TOLERANCE < control / 10, (difference, control)
