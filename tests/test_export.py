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
from peft_restorelcc.export import NO_OUTPUT_BIAS, save_merged

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


@pytest.mark.parametrize("architecture", sorted(set(ARCHITECTURES) & NO_OUTPUT_BIAS))
def test_export_refuses_architectures_that_would_drop_the_bias(architecture, tmp_path):
    model = adapted(architecture)
    with pytest.raises(ValueError, match="no config switch for an attention output bias"):
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
