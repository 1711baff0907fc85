"""The RestoreLCC tuner on real (tiny, random) transformers models of every supported architecture."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import PeftModel, get_peft_model
from tiny_models import ARCHITECTURES, make_tiny_model, random_input_ids

from peft_restorelcc import RestoreLCCConfig, RestoreLCCLayer, restorelcc_layers
from peft_restorelcc.tuner.heads import find_head_projections, projection_weight

HEADS = {0: [1], 1: [0, 3]}
HEAD_DIM = 8


def prune_half(model):
    """Zero the smaller half of every attention output projection weight, as a pruned model would have."""
    with torch.no_grad():
        for projection in find_head_projections(model):
            weight = projection_weight(model.get_submodule(projection.name))
            threshold = weight.abs().flatten().kthvalue(weight.numel() // 2).values
            weight[weight.abs() <= threshold] = 0.0
    return model


def wrapped(architecture, heads=HEADS, **config_kwargs):
    base = prune_half(make_tiny_model(architecture))
    config = RestoreLCCConfig(
        init_weights="gaussian", heads=heads, task_type="CAUSAL_LM", init_std=0.1, **config_kwargs
    )
    return get_peft_model(base, config).eval()


def base_state(model):
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_adapter_changes_output_and_disabling_restores_the_base(architecture):
    inputs = random_input_ids()
    reference = prune_half(make_tiny_model(architecture))(inputs).logits
    model = wrapped(architecture)
    adapted = model(inputs).logits
    assert (adapted - reference).abs().max() > 1e-4
    with model.disable_adapter():
        torch.testing.assert_close(model(inputs).logits, reference, rtol=0, atol=0)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_trainable_parameters_are_k_plus_d_per_head(architecture):
    model = wrapped(architecture)
    trainable = {name: p.numel() for name, p in model.named_parameters() if p.requires_grad}
    num_heads = sum(len(heads) for heads in HEADS.values())
    assert sum(trainable.values()) == num_heads * 2 * HEAD_DIM
    assert all("restorelcc_magnitude" in name or "restorelcc_bias" in name for name in trainable)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_merge_equals_unmerged_and_keeps_weights_bit_for_bit(architecture):
    inputs = random_input_ids()
    model = wrapped(architecture)
    weights_before = {n: t.clone() for n, t in model.named_parameters() if n.endswith("weight")}
    biases_before = {
        layer.layer_index: None if layer.get_base_layer().bias is None else layer.get_base_layer().bias.clone()
        for layer in restorelcc_layers(model)
    }
    unmerged = model(inputs).logits
    with pytest.warns(UserWarning) if architecture in ("qwen2", "mistral", "phi3") else _no_warning():
        model.merge_adapter()
    torch.testing.assert_close(model(inputs).logits, unmerged, rtol=1e-5, atol=1e-5)
    for name, weight in model.named_parameters():
        if name.endswith("weight"):
            assert torch.equal(weight, weights_before[name]), name
            assert (weight == 0).sum() == (weights_before[name] == 0).sum()
    model.unmerge_adapter()
    for layer in restorelcc_layers(model):
        before = biases_before[layer.layer_index]
        after = layer.get_base_layer().bias
        assert (after is None) if before is None else torch.equal(after, before)
    torch.testing.assert_close(model(inputs).logits, unmerged, rtol=0, atol=0)


class _no_warning:
    def __enter__(self):
        import warnings

        self._context = warnings.catch_warnings()
        self._context.__enter__()
        warnings.simplefilter("error", UserWarning)

    def __exit__(self, *exc):
        return self._context.__exit__(*exc)


@pytest.fixture(scope="module")
def reloaded_in_fresh_process(tmp_path_factory):
    """Save base + adapter of every architecture, reload them all in one fresh Python process (one start-up)."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("fresh_process")
    inputs = random_input_ids()
    for architecture in ARCHITECTURES:
        prune_half(make_tiny_model(architecture)).save_pretrained(root / architecture / "base")
        # Both processes use a base read from disk: kernels may round differently on differently laid-out weights.
        base = AutoModelForCausalLM.from_pretrained(root / architecture / "base").eval()
        config = RestoreLCCConfig(init_weights="gaussian", heads=HEADS, task_type="CAUSAL_LM", init_std=0.1)
        model = get_peft_model(base, config).eval()
        model.save_pretrained(root / architecture / "adapter")
        torch.save({"inputs": inputs, "expected": model(inputs).logits.detach()}, root / architecture / "expected.pt")
    code = textwrap.dedent(
        f"""
        import json, torch, peft_restorelcc
        torch.use_deterministic_algorithms(True, warn_only=True)  # as conftest does in the test process
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
        differences = {{}}
        for architecture in {list(ARCHITECTURES)!r}:
            folder = {str(root)!r} + "/" + architecture
            saved = torch.load(folder + "/expected.pt")
            base = AutoModelForCausalLM.from_pretrained(folder + "/base").eval()
            model = PeftModel.from_pretrained(base, folder + "/adapter")
            differences[architecture] = (model(saved["inputs"]).logits - saved["expected"]).abs().max().item()
        print(json.dumps(differences))
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_save_then_load_in_a_fresh_process_reproduces_the_output(architecture, reloaded_in_fresh_process):
    assert reloaded_in_fresh_process[architecture] == 0.0


def test_gqa_compensation_lands_on_the_query_head_slice():
    # Llama tiny has 4 query heads over 2 KV heads; head 3 is input slice [24, 32) of o_proj.
    model = wrapped("llama", heads={1: [3]})
    layer = next(restorelcc_layers(model))
    hidden = torch.randn(2, 5, layer.in_features)
    shift = torch.zeros(layer.in_features)
    shift[24:32] = layer.head_vectors("default")[0].detach()
    expected = layer.get_base_layer()(hidden + shift)
    torch.testing.assert_close(layer(hidden), expected, rtol=1e-5, atol=1e-6)
    assert layer.restorelcc_basis["default"].shape == (1, HEAD_DIM, HEAD_DIM)


def test_heads_per_layer_come_from_the_projection_width():
    # A structurally pruned model: 2 heads of head_dim 8 in a hidden size of 32.
    base = make_tiny_model("llama", num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    model = get_peft_model(base, RestoreLCCConfig(task_type="CAUSAL_LM"))
    assert [layer.num_heads for layer in restorelcc_layers(model)] == [2, 2]
    with pytest.raises(ValueError, match="Layer 0 has 2 heads"):
        get_peft_model(
            make_tiny_model("llama", num_attention_heads=2, num_key_value_heads=1, head_dim=8),
            RestoreLCCConfig(heads={0: [2]}, task_type="CAUSAL_LM"),
        )


def test_every_head_when_heads_is_empty():
    model = wrapped("llama", heads=None)
    assert {layer.layer_index: layer.head_indices["default"] for layer in restorelcc_layers(model)} == {
        0: [0, 1, 2, 3],
        1: [0, 1, 2, 3],
    }
    assert model.peft_config["default"].num_layers == 2


def test_num_components_shrinks_the_saved_basis(tmp_path):
    from safetensors.torch import load_file

    full, small = wrapped("llama"), wrapped("llama", num_components=2)
    full.save_pretrained(tmp_path / "full")
    small.save_pretrained(tmp_path / "small")
    full_tensors = load_file(tmp_path / "full" / "adapter_model.safetensors")
    small_tensors = load_file(tmp_path / "small" / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.self_attn.o_proj.restorelcc_basis"
    assert full_tensors[key].shape == (2, 8, 8) and small_tensors[key].shape == (2, 2, 8)
    trainable = sum(p.numel() for p in small.parameters() if p.requires_grad)
    assert trainable == 3 * (2 + HEAD_DIM)


@pytest.mark.parametrize("use_components, use_bias, per_head", [(True, False, HEAD_DIM), (False, True, HEAD_DIM)])
def test_ablation_switches(use_components, use_bias, per_head):
    model = wrapped("llama", use_components=use_components, use_bias=use_bias)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 3 * per_head
    inputs = random_input_ids()
    unmerged = model(inputs).logits
    model.merge_adapter()
    torch.testing.assert_close(model(inputs).logits, unmerged, rtol=1e-5, atol=1e-5)


def test_several_adapters_add_up_and_can_be_switched_and_deleted():
    inputs = random_input_ids()
    model = wrapped("llama", heads={1: [0]})
    second = RestoreLCCConfig(init_weights="gaussian", heads={1: [0, 2]}, init_std=0.1, task_type="CAUSAL_LM")
    model.add_adapter("second", second)
    with model.disable_adapter():
        base = model(inputs).logits
    first = model(inputs).logits
    model.set_adapter("second")
    second = model(inputs).logits
    model.base_model.set_adapter(["default", "second"])
    both = model(inputs).logits
    # The compensation is additive in the projection's output, so the effects add up exactly at that layer.
    layer = next(restorelcc_layers(model))
    shift_both = layer.output_shift(["default", "second"])
    torch.testing.assert_close(
        shift_both, layer.output_shift(["default"]) + layer.output_shift(["second"]), rtol=1e-6, atol=1e-7
    )
    assert not torch.allclose(both, first) and not torch.allclose(both, second)
    merged_both = model.merge_and_unload(adapter_names=["default", "second"])
    torch.testing.assert_close(merged_both(inputs).logits, both, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(base, both)


def test_delete_adapter_removes_its_tensors():
    model = wrapped("llama")
    model.add_adapter("other", RestoreLCCConfig(heads={0: [0]}, task_type="CAUSAL_LM"))
    model.delete_adapter("other")
    for layer in restorelcc_layers(model):
        assert "other" not in layer.restorelcc_basis and "other" not in layer.restorelcc_magnitude


def test_unload_returns_the_untouched_base():
    inputs = random_input_ids()
    reference = prune_half(make_tiny_model("llama"))(inputs).logits
    base = wrapped("llama").unload()
    assert not any(isinstance(m, RestoreLCCLayer) for m in base.modules())
    torch.testing.assert_close(base(inputs).logits, reference, rtol=0, atol=0)


def test_bf16_base_keeps_fp32_adapter_and_returns_bf16():
    base = prune_half(make_tiny_model("llama")).to(torch.bfloat16)
    model = get_peft_model(base, RestoreLCCConfig(heads=HEADS, task_type="CAUSAL_LM"))
    layer = next(restorelcc_layers(model))
    assert layer.restorelcc_magnitude["default"].dtype == torch.float32
    assert layer.restorelcc_basis["default"].dtype == torch.float32
    hidden = torch.randn(2, 3, layer.in_features, dtype=torch.bfloat16)
    assert layer(hidden).dtype == torch.bfloat16
    assert model(random_input_ids()).logits.dtype == torch.bfloat16


def test_half_precision_adapter_tensors_beside_the_fp32_basis_still_run():
    # What FSDP's mixed precision (param_dtype=bf16) hands the forward: trained tensors in bf16, the basis buffer not.
    model = wrapped("llama")
    layer = next(restorelcc_layers(model))
    hidden = torch.randn(2, 3, layer.in_features)
    with torch.no_grad():
        for parameters in (layer.restorelcc_magnitude, layer.restorelcc_bias):
            parameters["default"].data = parameters["default"].data.to(torch.bfloat16).float()
        expected = layer(hidden)
        for parameters in (layer.restorelcc_magnitude, layer.restorelcc_bias):
            parameters["default"].data = parameters["default"].data.to(torch.bfloat16)
        assert layer.restorelcc_basis["default"].dtype == torch.float32
        torch.testing.assert_close(layer(hidden), expected, rtol=0, atol=0)


def test_safe_merge_refuses_non_finite_values_and_changes_nothing():
    model = wrapped("llama")
    layer = next(restorelcc_layers(model))
    with torch.no_grad():
        layer.restorelcc_bias["default"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        model.merge_adapter(safe_merge=True)
    assert layer.get_base_layer().bias is None and not layer.merged


def test_generate_with_kv_cache_matches_merged_and_uncached():
    model = wrapped("llama")
    prompt = random_input_ids(batch=1, length=4)
    cached = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
    uncached = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=0)
    model.merge_adapter()
    merged = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
    assert torch.equal(cached, uncached) and torch.equal(cached, merged)


# Bad input: a clear ValueError, and the model is left unwrapped and unchanged.
@pytest.mark.parametrize(
    "architecture, model_overrides, config_kwargs, message",
    [
        ("llama", {}, {"heads": {0: [4]}}, r"Layer 0 has 4 heads \(0..3\); head indices \[4\]"),
        ("llama", {}, {"heads": {2: [0]}}, "names layer 2"),
        ("llama", {}, {"num_components": 9}, "exceeds head_dim=8"),
        ("llama", {}, {"target_modules": ["input_layernorm"]}, "LlamaRMSNorm"),
        ("llama", {"intermediate_size": 60}, {"target_modules": ["mlp.down_proj"]}, "not divisible by head_dim"),
        ("gpt2", {}, {"heads": {1: [7]}}, "head indices \\[7\\]"),
        ("gpt2", {}, {"target_modules": ["c_proj"]}, "matches more than one module in layer 0"),
        # PEFT intersects layers_to_transform with explicit heads (tests/test_peft_conventions.py); an empty
        # intersection leaves nothing to compensate.
        ("llama", {}, {"heads": {1: [2]}, "layers_to_transform": [0]}, r"heads names only layers \[1\]"),
    ],
)
def test_bad_input_leaves_the_model_unchanged(architecture, model_overrides, config_kwargs, message):
    model = make_tiny_model(architecture, **model_overrides)
    before = base_state(model)
    modules_before = [name for name, _ in model.named_modules()]
    with pytest.raises(ValueError, match=message):
        get_peft_model(model, RestoreLCCConfig(task_type="CAUSAL_LM", **config_kwargs))
    assert [name for name, _ in model.named_modules()] == modules_before
    assert not hasattr(model, "peft_config")
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"hidden_size": 48, "intermediate_size": 64}, "made for head_dim=8, but the base model has head_dim=12"),
        ({"num_hidden_layers": 3}, "made for a model with 2 attention layers, but the base model has 3"),
    ],
)
def test_loading_onto_a_mismatched_base_is_refused(tmp_path, overrides, message):
    wrapped("llama").save_pretrained(tmp_path)
    other = make_tiny_model("llama", **overrides)
    modules_before = [name for name, _ in other.named_modules()]
    with pytest.raises(ValueError, match=message):
        PeftModel.from_pretrained(other, tmp_path)
    assert [name for name, _ in other.named_modules()] == modules_before


def test_adapter_config_file_names_the_method(tmp_path):
    wrapped("llama").save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "RESTORELCC" and saved["heads"] == {"0": [1], "1": [0, 3]}
    assert saved["head_dim"] == 8 and saved["num_layers"] == 2
