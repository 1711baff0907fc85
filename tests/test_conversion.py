"""Qwen2 / Mistral / Phi-3 merged models saved as the equivalent Llama: stock transformers reloads them with the same
logits as the unmerged adapter, every stored weight unchanged, or the export refuses with one line."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from test_cli_prune import make_char_tokenizer
from tiny_models import make_tiny_model, random_input_ids
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

from peft_restorelcc import RestoreLCCConfig
from peft_restorelcc.io.conversion import PROVENANCE_KEY, conversion_problem, convert_to_llama
from peft_restorelcc.io.export import save_merged

HEADS = {0: [1], 1: [0, 3]}  # compensated heads: (layer, head) pairs of the tiny 2-layer, 4-head models

# name -> (family, config overrides): each an exactly equivalent case that must convert.
CONVERTIBLE_CASES: dict[str, tuple[str, dict]] = {
    "qwen2": ("qwen2", {}),
    "qwen2_tied": ("qwen2", {"tie_word_embeddings": True}),
    "mistral_no_window": ("mistral", {"sliding_window": None}),
    # A window as long as the context never hides a key: transformers' mask is then the plain causal one.
    "mistral_window_at_context": ("mistral", {"sliding_window": 64}),
    "mistral_head_dim_16_linear_rope": (
        "mistral",
        {"sliding_window": None, "head_dim": 16, "rope_parameters": {"rope_type": "linear", "factor": 2.0}},
    ),
    "phi3": ("phi3", {}),
}


def prune_all_linear(model: nn.Module) -> nn.Module:
    """Zero the smaller half of every decoder Linear (fused Phi-3 projections included), as pruning would."""
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and ".layers." in name:
                weight = module.weight
                threshold = weight.abs().flatten().kthvalue(weight.numel() // 2).values
                weight[weight.abs() <= threshold] = 0.0
    return model


def adapted(family: str, **overrides):
    base = prune_all_linear(make_tiny_model(family, **overrides))
    base.generation_config = GenerationConfig(max_new_tokens=7, do_sample=True, temperature=0.7, eos_token_id=2)
    return get_peft_model(base, RestoreLCCConfig(init_weights="gaussian", heads=HEADS, init_std=0.1, task_type="CAUSAL_LM")).eval()


def llama_named_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's weights under Llama's names (Phi-3's fused projections split by rows)."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    weights = {}
    for name, tensor in model.state_dict().items():
        if not name.endswith("weight") or "restorelcc_" in name:
            continue
        name = name.replace(".base_layer.", ".")  # the adapted o_proj wraps the pruned Linear
        tensor = tensor.detach().clone()
        if name.endswith("qkv_proj.weight"):
            q, k, v = tensor.split(
                [config.num_attention_heads * head_dim] + [config.num_key_value_heads * head_dim] * 2, dim=0
            )
            prefix = name[: -len("qkv_proj.weight")]
            weights.update({prefix + "q_proj.weight": q, prefix + "k_proj.weight": k, prefix + "v_proj.weight": v})
        elif name.endswith("gate_up_proj.weight"):
            gate, up = tensor.chunk(2, dim=0)
            prefix = name[: -len("gate_up_proj.weight")]
            weights.update({prefix + "gate_proj.weight": gate, prefix + "up_proj.weight": up})
        else:
            weights[name] = tensor
    return weights


@pytest.fixture(scope="module")
def stock_reload(tmp_path_factory):
    """Export every convertible case, then reload them all with stock transformers in one fresh process that never
    imports peft_restorelcc (nor peft)."""
    root = tmp_path_factory.mktemp("converted")
    inputs = random_input_ids()
    for case, (family, overrides) in CONVERTIBLE_CASES.items():
        model = adapted(family, **overrides)
        expected = model(inputs).logits.detach()
        weights = llama_named_weights(model.get_base_model())
        save_merged(model, root / case, tokenizer=make_char_tokenizer())
        torch.save({"inputs": inputs, "expected": expected, "weights": weights}, root / f"{case}.pt")
    code = textwrap.dedent(
        f"""
        import json, sys, torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
        report = {{}}
        for case in {list(CONVERTIBLE_CASES)!r}:
            saved = torch.load({str(root)!r} + f"/{{case}}.pt")
            directory = {str(root)!r} + "/" + case
            model = AutoModelForCausalLM.from_pretrained(directory).eval()
            with torch.no_grad():
                difference = (model(saved["inputs"]).logits - saved["expected"]).abs().max().item()
            state = model.state_dict()
            report[case] = {{
                "class": type(model).__name__,
                "difference": difference,
                "weights_missing": sorted(set(saved["weights"]) - set(state)),
                "weights_changed": sorted(n for n, w in saved["weights"].items() if n in state and
                                          not (torch.equal(state[n], w) and torch.equal(state[n] == 0, w == 0))),
                "o_proj_bias_nonzero": int(sum(bool(state[n].abs().sum() > 0) for n in state
                                               if n.endswith("o_proj.bias"))),
                "tokenizer_ids": AutoTokenizer.from_pretrained(directory)("abc")["input_ids"],
                "generation": GenerationConfig.from_pretrained(directory).to_diff_dict(),
                "provenance": model.config.to_dict().get({PROVENANCE_KEY!r}),
                "sparsity_config": "sparsity_config" in model.config.to_dict(),
            }}
        assert "peft_restorelcc" not in sys.modules and "peft" not in sys.modules
        print(json.dumps(report))
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", list(CONVERTIBLE_CASES))
def test_converted_model_reloads_in_stock_transformers_with_the_adapters_logits(case, stock_reload):
    report = stock_reload[case]
    assert report["class"] == "LlamaForCausalLM"
    assert report["difference"] <= 1e-5
    assert report["o_proj_bias_nonzero"] == 2  # the compensation of both adapted layers is in the saved bias


@pytest.mark.parametrize("case", list(CONVERTIBLE_CASES))
def test_every_weight_and_every_zero_is_kept_bit_for_bit(case, stock_reload):
    report = stock_reload[case]
    assert report["weights_missing"] == [] or report["weights_missing"] == ["lm_head.weight"]  # tied: one tensor
    assert report["weights_changed"] == []


@pytest.mark.parametrize("case", list(CONVERTIBLE_CASES))
def test_tokenizer_generation_config_and_provenance_are_carried_over(case, stock_reload):
    report = stock_reload[case]
    assert report["tokenizer_ids"] == make_char_tokenizer()("abc")["input_ids"]
    generation = report["generation"]
    assert (generation["max_new_tokens"], generation["temperature"], generation["do_sample"]) == (7, 0.7, True)
    provenance = report["provenance"]
    assert provenance["source_model_type"] == CONVERTIBLE_CASES[case][0]
    assert provenance["merged"] is True and provenance["converted_to"] == "llama"
    assert set(provenance) >= {"base_model", "base_revision", "source_architectures"}
    assert report["sparsity_config"] is False


# name -> (family, config overrides, text the one-line refusal must contain)
REFUSED_CASES: dict[str, tuple[str, dict, str]] = {
    "mistral_active_window": ("mistral", {"sliding_window": 16}, "sliding_window=16 is below max_position_embeddings"),
    "qwen2_sliding_window": ("qwen2", {"use_sliding_window": True, "sliding_window": 16}, "use_sliding_window is on"),
    "phi3_active_window": ("phi3", {"sliding_window": 16}, "sliding_window=16 is below"),
    "phi3_partial_rotary": (
        "phi3",
        {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}},
        "partial_rotary_factor=0.5",
    ),
}


@pytest.mark.parametrize("case", list(REFUSED_CASES))
def test_not_exactly_equivalent_configs_are_refused_with_one_line(case, tmp_path):
    family, overrides, reason = REFUSED_CASES[case]
    model = adapted(family, **overrides)
    with pytest.raises(ValueError) as caught:
        save_merged(model, tmp_path / "out")
    message = str(caught.value)
    assert "\n" not in message and reason in message and "unmerged" in message
    assert not (tmp_path / "out").exists()
    assert not any(getattr(m, "merged", False) for m in model.modules())  # refused before merging


def tiny_mixtral_config():
    return AutoConfig.for_model(
        "mixtral",
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=2,
        num_experts_per_tok=1,
        max_position_embeddings=64,
        sliding_window=None,
    )


def test_mixtral_is_refused_with_a_reason_and_what_to_do(tmp_path):
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(tiny_mixtral_config()).eval()
    model = get_peft_model(base, RestoreLCCConfig(init_weights="gaussian", heads=HEADS, init_std=0.1, task_type="CAUSAL_LM"))
    with pytest.raises(ValueError, match="mixture-of-experts.*keep the adapter unmerged") as caught:
        save_merged(model, tmp_path / "out")
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "out").exists()


def test_an_unknown_config_field_is_refused_not_guessed():
    config = make_tiny_model("qwen2").config
    config.some_future_switch = True
    assert "['some_future_switch']" in conversion_problem(config)


def test_a_quantized_config_is_refused():
    config = make_tiny_model("mistral", sliding_window=None).config
    config.quantization_config = {"quant_method": "bitsandbytes"}
    assert "quantized" in conversion_problem(config)


def test_sparsity_config_is_not_carried_into_the_converted_model():
    merged = adapted("qwen2").merge_and_unload()
    merged.config.sparsity_config = {"format": "dense", "targets": ["Linear"]}
    assert "sparsity_config" not in convert_to_llama(merged).config.to_dict()


def test_a_conversion_that_changes_the_logits_is_refused(monkeypatch):
    from peft_restorelcc.io import conversion

    original = conversion._llama_state_dict

    def off_by_a_little(*args, **kwargs):
        state = original(*args, **kwargs)
        state["model.norm.weight"] = state["model.norm.weight"] * 1.01
        return state

    monkeypatch.setattr(conversion, "_llama_state_dict", off_by_a_little)
    with pytest.raises(ValueError, match="logits differ"):
        convert_to_llama(adapted("qwen2").merge_and_unload())


def test_the_cli_merges_a_qwen2_into_a_llama_and_refuses_an_active_mistral_window(tmp_path: Path, capsys) -> None:
    from peft_restorelcc.cli import main as run_cli

    def save_model(path: Path, model: nn.Module) -> Path:
        model.save_pretrained(path)
        make_char_tokenizer().save_pretrained(path)
        return path

    def save_adapter(path: Path, model_dir: Path) -> Path:
        base = AutoModelForCausalLM.from_pretrained(model_dir)
        get_peft_model(base, RestoreLCCConfig(init_weights="gaussian", heads=HEADS, init_std=0.1, task_type="CAUSAL_LM")).save_pretrained(path)
        return path

    qwen2 = save_model(tmp_path / "qwen2", prune_all_linear(make_tiny_model("qwen2")))
    adapter = save_adapter(tmp_path / "qwen2_adapter", qwen2)
    assert run_cli(["merge", "--model", str(qwen2), "--adapter", str(adapter), "--output", str(tmp_path / "m")]) == 0
    assert "unchanged" in capsys.readouterr().out
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert saved["architectures"] == ["LlamaForCausalLM"] and saved["attention_bias"] is True
    assert saved[PROVENANCE_KEY]["base_model"] == str(qwen2)  # the adapter's base_model_name_or_path

    mistral = save_model(tmp_path / "mistral", prune_all_linear(make_tiny_model("mistral", sliding_window=16)))
    adapter = save_adapter(tmp_path / "mistral_adapter", mistral)
    output = tmp_path / "refused"
    assert run_cli(["merge", "--model", str(mistral), "--adapter", str(adapter), "--output", str(output)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # earlier lines: progress bars of the set-up's saves
    assert err.startswith("restorelcc merge: error: Cannot export") and "sliding_window=16 is below" in err
    assert not output.exists()


# Config fields as published checkpoints have them (size fields shrunk: only the checked fields matter here).
_SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=97)
HUB_LIKE_CONFIGS = {
    # Qwen2.5-0.5B-Instruct: the window fields are present but switched off; tied embeddings.
    "qwen2.5": (
        "qwen2",
        dict(
            use_sliding_window=False,
            sliding_window=32768,
            max_window_layers=21,
            tie_word_embeddings=True,
            rope_theta=1000000.0,
            max_position_embeddings=32768,
        ),
        None,
    ),
    # Mistral-7B-v0.1: a 4096-token window in a 32768-token context.
    "mistral-v0.1": ("mistral", dict(sliding_window=4096, max_position_embeddings=32768), "sliding_window=4096"),
    # Mistral-7B-v0.3: no window.
    "mistral-v0.3": ("mistral", dict(sliding_window=None, max_position_embeddings=32768, rope_theta=1e6), None),
    # Phi-3-mini-4k-instruct: a 2047-token window in a 4096-token context.
    "phi-3-mini-4k": ("phi3", dict(sliding_window=2047, max_position_embeddings=4096), "sliding_window=2047"),
    # Phi-4 (model_type phi3): no window, plain RoPE.
    "phi-4": ("phi3", dict(sliding_window=None, max_position_embeddings=16384, rope_theta=250000), None),
}


@pytest.mark.parametrize("name", list(HUB_LIKE_CONFIGS))
def test_published_config_shapes_are_accepted_or_refused_as_expected(name):
    family, fields, refusal = HUB_LIKE_CONFIGS[name]
    config = AutoConfig.for_model(family, **{**_SMALL, **fields})
    problem = conversion_problem(config)
    assert problem is None if refusal is None else refusal in problem


@torch.no_grad()
def test_a_window_as_long_as_the_context_hides_nothing_at_full_length():
    """transformers' Mistral mask keeps key k for query q when k > q - sliding_window: a window of
    max_position_embeddings tokens keeps every key of a full-length sequence, one token shorter does not."""
    inputs = torch.randint(3, 97, (1, 64), generator=torch.Generator().manual_seed(0))
    merged = adapted("mistral", sliding_window=64).merge_and_unload()
    converted = convert_to_llama(merged)
    assert (converted(inputs).logits - merged(inputs).logits).abs().max() <= 1e-5
    merged.config.sliding_window = 63  # the control: now the source hides the first key from the last query
    assert (converted(inputs).logits - merged(inputs).logits)[0, -1].abs().max() > 1e-4


@pytest.mark.parametrize("family", ["qwen2", "mistral", "phi3"])
@torch.no_grad()
def test_a_bf16_model_converts_with_the_same_logits_in_memory(family):
    model = adapted(family).to(torch.bfloat16)
    inputs = random_input_ids()
    expected = model(inputs).logits
    converted = convert_to_llama(model.merge_and_unload())
    assert converted.dtype == torch.bfloat16
    assert torch.equal(converted(inputs).logits, expected)
