"""A merged model survives save_pretrained + a stock reload, or the export refuses: never a silent loss."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import get_peft_model
from test_model import HEADS, prune_half
from tiny_models import ARCHITECTURES, make_tiny_model, random_input_ids

from peft_restorelcc import RestoreLCCConfig
from peft_restorelcc.io.export import NO_OUTPUT_BIAS, save_merged

RELOADABLE = [architecture for architecture in ARCHITECTURES if architecture not in NO_OUTPUT_BIAS]


def adapted(architecture):
    base = prune_half(make_tiny_model(architecture))
    config = RestoreLCCConfig(init_weights="gaussian", heads=HEADS, init_std=0.1, task_type="CAUSAL_LM")
    return get_peft_model(base, config).eval()


@pytest.fixture(scope="module")
def stock_reload_differences(tmp_path_factory):
    """Export every reloadable architecture, then reload them all with stock transformers in one fresh process
    that never imports peft_restorelcc (nor peft)."""
    root = tmp_path_factory.mktemp("merged")
    inputs = random_input_ids()
    zeros = {}
    for architecture in RELOADABLE:
        model = adapted(architecture)
        expected = model(inputs).logits.detach()
        save_merged(model, root / architecture)
        torch.save({"inputs": inputs, "expected": expected}, root / f"{architecture}.pt")
        zeros[architecture] = {
            name: int((p == 0).sum()) for name, p in model.get_base_model().named_parameters() if "weight" in name
        }
    code = textwrap.dedent(
        f"""
        import json, sys, torch
        torch.use_deterministic_algorithms(True, warn_only=True)
        from transformers import AutoModelForCausalLM
        report = {{}}
        for architecture in {RELOADABLE!r}:
            saved = torch.load({str(root)!r} + f"/{{architecture}}.pt")
            model = AutoModelForCausalLM.from_pretrained({str(root)!r} + "/" + architecture).eval()
            difference = (model(saved["inputs"]).logits - saved["expected"]).abs().max().item()
            zeros = {{n: int((p == 0).sum()) for n, p in model.named_parameters() if "weight" in n}}
            report[architecture] = {{"difference": difference, "zeros": zeros}}
        assert "peft_restorelcc" not in sys.modules and "peft" not in sys.modules
        print(json.dumps(report))
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1]), zeros


@pytest.mark.parametrize("architecture", RELOADABLE)
def test_merged_model_reloads_in_stock_transformers_with_the_same_output(architecture, stock_reload_differences):
    report, zeros_before = stock_reload_differences
    assert report[architecture]["difference"] < 1e-5
    # Sparsity is kept: every weight has exactly the zeros it had before merging.
    for name, count in zeros_before[architecture].items():
        assert report[architecture]["zeros"][name] == count, name


# Issue 36: these families are now saved as the equivalent Llama (tests/test_conversion.py); still refused is a
# config that Llama cannot reproduce exactly, here an active sliding window.
NOT_EQUIVALENT = {"qwen2": {"use_sliding_window": True, "sliding_window": 16}, "mistral": {"sliding_window": 16}}
NOT_EQUIVALENT["phi3"] = NOT_EQUIVALENT["mistral"]


@pytest.mark.parametrize("architecture", sorted(set(ARCHITECTURES) & NO_OUTPUT_BIAS))
def test_export_refuses_architectures_that_would_drop_the_bias(architecture, tmp_path):
    base = prune_half(make_tiny_model(architecture, **NOT_EQUIVALENT[architecture]))
    model = get_peft_model(base, RestoreLCCConfig(init_weights="gaussian", heads=HEADS, init_std=0.1, task_type="CAUSAL_LM")).eval()
    with pytest.raises(ValueError, match="sliding_window"):
        save_merged(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # The model is untouched: still wrapped, nothing merged.
    assert not any(getattr(m, "merged", False) for m in model.modules())


def test_merge_and_unload_switches_the_llama_config_on():
    merged = adapted("llama").merge_and_unload()
    assert merged.config.attention_bias is True
    attention = merged.model.layers[0].self_attn
    assert all(torch.count_nonzero(getattr(attention, n).bias) == 0 for n in ("q_proj", "k_proj", "v_proj"))
    assert attention.o_proj.bias is not None


def test_export_refuses_a_non_empty_output_directory(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        save_merged(adapted("llama"), tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


SPARSITY_ONLY = {
    "quant_method": "compressed-tensors",
    "sparsity_config": {"format": "dense", "targets": ["Linear"], "ignore": ["lm_head"], "global_sparsity": 0.5},
}


@pytest.mark.parametrize("architecture", ["llama", "qwen2"])  # kept as Llama / converted to Llama
def test_a_merged_model_carries_no_sparsity_config_a_server_would_reject(architecture, tmp_path):
    model = adapted(architecture)
    base_config = model.get_base_model().config
    base_config.quantization_config = dict(SPARSITY_ONLY)  # as stock from_pretrained of an llm-compressor model
    base_config.sparsity_config = dict(SPARSITY_ONLY["sparsity_config"])
    save_merged(model, tmp_path / "merged")
    saved = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in saved and "sparsity_config" not in saved


def test_a_real_quantization_config_is_not_stripped():
    from peft_restorelcc.io.export import strip_serving_blockers

    config = make_tiny_model("llama").config
    config.quantization_config = {"quant_method": "compressed-tensors", "config_groups": {"group_0": {}}}
    assert strip_serving_blockers(config) == []
    assert config.quantization_config["config_groups"]
    config.quantization_config = dict(SPARSITY_ONLY)
    assert strip_serving_blockers(config) == ["quantization_config"]
