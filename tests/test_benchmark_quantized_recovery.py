"""benchmarks/quantized_recovery.py's measurements on a tiny Llama: the zeros of a pruned model seen through its
dequantized bitsandbytes weights, and quantized tensors that LLM.int8 moves (not changes) on its first forward."""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("bitsandbytes")

from benchmark_scripts import load_benchmark  # noqa: E402
from tiny_models import make_tiny_model, random_input_ids  # noqa: E402
from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: E402

from peft_restorelcc.io.export import changed_quantized_tensors  # noqa: E402

# bitsandbytes' 4-bit blocks are 64 wide (test_quantized.TINY).
TINY = dict(hidden_size=64, intermediate_size=128)


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("quantized_recovery")


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """A tiny Llama with every other weight of each decoder Linear zeroed, saved, and its zero masks."""
    model = make_tiny_model("llama", **TINY)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head"):
                module.weight.view(-1)[::2] = 0
    path = tmp_path_factory.mktemp("pruned")
    model.save_pretrained(path)
    return path, model


def load(path, fmt):
    config = (BitsAndBytesConfig(load_in_8bit=True) if fmt == "int8" else
              BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32))  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(path, quantization_config=config, device_map="cpu", dtype=torch.float32)


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_the_pruned_zeros_survive_quantization_and_are_counted_on_the_dequantized_weights(bench, pruned, fmt):
    path, model = pruned
    zeros = bench.pruned_zeros(model)
    assert zeros and not any(name.endswith("lm_head") for name in zeros)
    stats = bench.zero_stats(load(path, fmt), zeros)
    assert stats["pruned_zeros_kept"] == 1.0  # NF4 and LLM.int8 both have an exact zero
    assert stats["sparsity"] >= 0.5 and stats["zeros_not_from_pruning"] == pytest.approx(stats["sparsity"] - 0.5)


def test_int8_scales_moved_by_the_first_forward_are_not_counted_as_changed(bench, pruned):
    model = load(pruned[0], "int8")
    before = bench.quantized_state(model)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model(random_input_ids(1, 8))
    assert any(name.endswith(".SCB") for name in before)
    assert changed_quantized_tensors(before, bench.quantized_state(model)) == []


def test_a_wrapped_model_names_its_quantized_tensors_as_the_plain_model(bench, pruned):
    import peft

    import peft_restorelcc

    plain = bench.quantized_state(load(pruned[0], "nf4"))
    config = peft_restorelcc.RestoreLCCConfig(heads={0: [0]}, task_type="CAUSAL_LM")
    wrapped = bench.quantized_state(peft.get_peft_model(load(pruned[0], "nf4"), config))
    assert changed_quantized_tensors(plain, wrapped) == [] and plain.keys() == wrapped.keys()
