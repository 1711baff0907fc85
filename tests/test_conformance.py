"""PEFT's generic tuner contract, held against RestoreLCC: output, disable, merge, save/load, state dicts, NaN
guard, training, gradient checkpointing, generate and half precision, on tiny Llama, Qwen2, GPT-2 (Conv1D) and OPT
with several configs (see conformance.py). Outputs are compared with the base model and with an independent
computation of what the method adds, and every check first makes sure the adapter changes the logits."""

import copy
import pickle
import warnings

import pytest
import torch
from conformance import (
    ARCHITECTURES,
    CONFIGS,
    assert_non_trivial,
    assert_same,
    base_logits,
    logits,
    restorelcc_model,
)
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
from tiny_models import make_tiny_model, random_input_ids
from transformers import AutoModelForCausalLM

from peft_restorelcc import RestoreLCCLayer, restorelcc_layers

MATRIX = [(architecture, config_name) for architecture in ARCHITECTURES for config_name in CONFIGS]
PEFT_NAN_MESSAGE = "NaNs detected in the merged weights. The adapter default seems to be broken"


def shifted_base_logits(model, architecture: str, inputs: torch.Tensor) -> torch.Tensor:
    """The base model with ``m_h V_h + b_h`` added to each selected head's slice of the projection input by forward
    pre-hooks: the method's definition, computed without the layer's code."""
    base = make_tiny_model(architecture)
    handles = []
    for name, layer in model.named_modules():
        if not isinstance(layer, RestoreLCCLayer):
            continue
        shift = torch.zeros(layer.num_heads, layer.head_dim)
        for adapter_name in layer.active_adapters:
            vectors = torch.zeros(len(layer.head_indices[adapter_name]), layer.head_dim)
            if adapter_name in layer.restorelcc_magnitude:
                magnitude, basis = layer.restorelcc_magnitude[adapter_name], layer.restorelcc_basis[adapter_name]
                vectors += (magnitude.unsqueeze(-1) * basis).sum(dim=1)
            if adapter_name in layer.restorelcc_bias:
                vectors += layer.restorelcc_bias[adapter_name]
            for row, head in enumerate(layer.head_indices[adapter_name]):
                shift[head] += vectors[row].detach()
        target = base.get_submodule(name.removeprefix("base_model.model."))
        flat = shift.reshape(-1)
        handles.append(target.register_forward_pre_hook(lambda module, args, flat=flat: (args[0] + flat,)))
    try:
        return logits(base, inputs)
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("architecture, config_name", MATRIX)
def test_output_is_the_base_with_shifted_head_inputs(architecture, config_name):
    inputs = random_input_ids()
    model = restorelcc_model(architecture, config_name)
    adapted = logits(model, inputs)
    assert_non_trivial(adapted, base_logits(architecture, inputs))
    torch.testing.assert_close(adapted, shifted_base_logits(model, architecture, inputs), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("architecture, config_name", MATRIX)
def test_disable_adapter_gives_the_base_outputs_merged_or_not(architecture, config_name):
    inputs = random_input_ids()
    base = base_logits(architecture, inputs)
    model = restorelcc_model(architecture, config_name)
    adapted = logits(model, inputs)
    assert_non_trivial(adapted, base)
    with model.disable_adapter():
        assert_same(logits(model, inputs), base)
    assert_same(logits(model, inputs), adapted)
    model.merge_adapter()
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, inputs), base, rtol=0, atol=0)
    # As in PEFT's tuners, disabling a merged model unmerges it; enabled again, it gives the adapted outputs.
    assert_same(logits(model, inputs), adapted)


@pytest.mark.parametrize("architecture, config_name", MATRIX)
def test_merge_unmerge_merge_and_unload_and_unload(architecture, config_name):
    inputs = random_input_ids()
    base = base_logits(architecture, inputs)
    model = restorelcc_model(architecture, config_name)
    weights = {name: p.detach().clone() for name, p in model.named_parameters() if name.endswith("weight")}
    adapted = logits(model, inputs)
    assert_non_trivial(adapted, base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Qwen2 warns that a stock reload of the merged model drops the bias.
        model.merge_adapter()
    assert all(layer.merged for layer in restorelcc_layers(model))
    # Merged and unmerged run the same bias through the same kernel: the same bits.
    assert_same(logits(model, inputs), adapted)
    model.unmerge_adapter()
    assert not any(layer.merged for layer in restorelcc_layers(model))
    assert_same(logits(model, inputs), adapted)
    with model.disable_adapter():
        assert_same(logits(model, inputs), base)
    for name, parameter in model.named_parameters():
        if name.endswith("weight"):
            assert torch.equal(parameter, weights[name]), f"{name} changed: merging must never touch a weight"

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = model.merge_and_unload(safe_merge=True)
    assert not any(isinstance(module, RestoreLCCLayer) for module in merged.modules())
    assert_same(logits(merged, inputs), adapted)

    unloaded = restorelcc_model(architecture, config_name).unload()
    assert not any(isinstance(module, RestoreLCCLayer) for module in unloaded.modules())
    assert_same(logits(unloaded, inputs), base)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_merged_model_saved_and_reloaded_by_stock_transformers(architecture, tmp_path):
    inputs = random_input_ids()
    model = restorelcc_model(architecture, "some_heads_k3")
    adapted = logits(model, inputs)
    if architecture == "qwen2":
        # Qwen2 builds o_proj without a bias and has no config switch for one: the merge warns, naming the problem.
        with pytest.warns(UserWarning, match="no config switch for an attention output bias"):
            model.merge_and_unload()
        return
    merged = model.merge_and_unload()
    merged.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert_same(logits(reloaded, inputs), adapted)


@pytest.mark.parametrize("architecture, config_name", MATRIX)
@pytest.mark.parametrize("safe_serialization", [True, False])
def test_save_and_load_reproduce_the_outputs(architecture, config_name, safe_serialization, tmp_path):
    inputs = random_input_ids()
    model = restorelcc_model(architecture, config_name)
    adapted = logits(model, inputs)
    assert_non_trivial(adapted, base_logits(architecture, inputs))
    model.save_pretrained(tmp_path, safe_serialization=safe_serialization)
    weights_file = "adapter_model.safetensors" if safe_serialization else "adapter_model.bin"
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(
        ["adapter_config.json", "README.md", weights_file]
    )
    loaded = PeftModel.from_pretrained(make_tiny_model(architecture), tmp_path).eval()
    assert_same(logits(loaded, inputs), adapted)
    # Loaded for inference: nothing trains; is_trainable=True makes exactly the adapter's m and b trainable.
    assert not any(parameter.requires_grad for parameter in loaded.parameters())
    trainable = PeftModel.from_pretrained(make_tiny_model(architecture), tmp_path, is_trainable=True)
    assert {name for name, p in trainable.named_parameters() if p.requires_grad} == {
        name for name, p in model.named_parameters() if p.requires_grad
    }


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_load_with_low_cpu_mem_usage(architecture, tmp_path):
    inputs = random_input_ids()
    model = restorelcc_model(architecture, "some_heads_k3")
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make_tiny_model(architecture), tmp_path, low_cpu_mem_usage=True).eval()
    assert not any(tensor.is_meta for tensor in loaded.state_dict().values())
    assert_same(logits(loaded, inputs), logits(model, inputs))


@pytest.mark.parametrize("architecture, config_name", MATRIX)
def test_peft_state_dict_round_trip(architecture, config_name):
    inputs = random_input_ids()
    source = restorelcc_model(architecture, config_name, seed=0)
    target = restorelcc_model(architecture, config_name, seed=1)
    assert_non_trivial(logits(source, inputs), logits(target, inputs))
    state = get_peft_model_state_dict(source)
    names = {name.rsplit(".", 1)[-1] for name in state}
    expected = {"restorelcc_basis"}
    expected |= {"restorelcc_magnitude"} if source.peft_config["default"].use_components else set()
    expected |= {"restorelcc_bias"} if source.peft_config["default"].use_bias else set()
    assert names == expected, "the saved state is the basis, m and b: no base weight, nothing missing"
    result = set_peft_model_state_dict(target, state)
    assert not result.unexpected_keys
    assert not [key for key in result.missing_keys if "restorelcc_" in key]
    assert_same(logits(target, inputs), logits(source, inputs))


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
@pytest.mark.parametrize("parameter", ["restorelcc_magnitude", "restorelcc_bias"])
def test_safe_merge_refuses_non_finite_adapters_in_peft_words(architecture, bad_value, parameter):
    inputs = random_input_ids()
    model = restorelcc_model(architecture, "some_heads_k3")
    layer = list(restorelcc_layers(model))[-1]
    with torch.no_grad():
        getattr(layer, parameter)["default"][0, 0] = bad_value
    bias_before = None if layer.get_base_layer().bias is None else layer.get_base_layer().bias.clone()
    state_before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with pytest.raises(ValueError, match=PEFT_NAN_MESSAGE):
            model.merge_and_unload(safe_merge=True)
        with pytest.raises(ValueError, match=PEFT_NAN_MESSAGE):
            model.merge_adapter(safe_merge=True)
    # Nothing merged, nothing changed: the same tensors, and the same (non-finite) outputs as before.
    assert not any(module.merged for module in restorelcc_layers(model))
    bias_after = layer.get_base_layer().bias
    assert (bias_after is None) if bias_before is None else torch.equal(bias_after, bias_before)
    state_after = model.state_dict()
    assert state_after.keys() == state_before.keys()
    assert all(torch.allclose(state_after[k], state_before[k], rtol=0, atol=0, equal_nan=True) for k in state_before)
    assert not torch.isfinite(logits(model, inputs)).all()


@pytest.mark.parametrize("architecture, config_name", MATRIX)
def test_training_changes_only_the_adapter(architecture, config_name):
    inputs = random_input_ids()
    model = restorelcc_model(architecture, config_name)
    before = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    config = model.peft_config["default"]
    expected = {
        name
        for name, used in [("restorelcc_magnitude", config.use_components), ("restorelcc_bias", config.use_bias)]
        if used
    }
    assert {name.rsplit(".", 2)[-2] for name in trainable} == expected
    model.train()
    # Every parameter goes to the optimiser, as a careless training script would: only the adapter may move.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        model(inputs, labels=inputs).loss.backward()
        optimizer.step()
    after = model.state_dict()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed == trainable, f"changed {sorted(changed - trainable)}, unchanged {sorted(trainable - changed)}"


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_gradient_checkpointing_gives_the_same_gradients(architecture):
    inputs = random_input_ids()

    def gradients(checkpointing: bool) -> dict:
        model = restorelcc_model(architecture, "some_heads_k3")
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
            # The base is frozen, so the embeddings' output must ask for gradients for re-entrant checkpoints.
            model.enable_input_require_grads()
            assert model.base_model.model.is_activation_checkpointing
        model.train()
        torch.manual_seed(0)  # the same dropout masks in both runs (checkpointing replays the RNG state)
        model(inputs, labels=inputs).loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}

    plain, checkpointed = gradients(False), gradients(True)
    assert plain.keys() == checkpointed.keys() and all(grad.abs().max() > 0 for grad in plain.values())
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_generate_follows_the_adapter_and_disable_adapter(architecture):
    prompt = random_input_ids(batch=2, length=5)
    settings = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0, "return_dict_in_generate": True}
    settings["output_scores"] = True
    model = restorelcc_model(architecture, "all_heads")
    base = make_tiny_model(architecture)
    base_run = base.generate(prompt, **settings)
    cached = model.generate(input_ids=prompt, **settings)
    uncached = model.generate(input_ids=prompt, use_cache=False, **settings)
    # The first step's scores are the adapted model's last-position logits.
    torch.testing.assert_close(cached.scores[0], logits(model, prompt)[:, -1], rtol=1e-5, atol=1e-6)
    assert_non_trivial(cached.scores[0], base_run.scores[0])
    assert torch.equal(cached.sequences, uncached.sequences)
    with model.disable_adapter():
        disabled = model.generate(input_ids=prompt, **settings)
    assert torch.equal(disabled.sequences, base_run.sequences)
    # PEFT's own tolerance: PeftModel.generate feeds the first step slightly differently (a disabled LoRA differs
    # from its base by the same 6e-8 here), far below the adapter's effect.
    for step_scores, base_scores in zip(disabled.scores, base_run.scores):
        torch.testing.assert_close(step_scores, base_scores, rtol=1e-6, atol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.merge_adapter()
    merged = model.generate(input_ids=prompt, **settings)
    assert torch.equal(merged.sequences, cached.sequences)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_base(architecture, dtype):
    inputs = random_input_ids()
    base = base_logits(architecture, inputs, dtype=dtype)
    model = restorelcc_model(architecture, "some_heads_k3", dtype=dtype)
    for layer in restorelcc_layers(model):
        # The tiny adapter stays fp32 whatever the base: its small updates would vanish in bf16.
        assert all(p.dtype == torch.float32 for p in layer.restorelcc_magnitude.values())
        assert all(b.dtype == torch.float32 for b in layer.restorelcc_basis.values())
    adapted = logits(model, inputs)
    assert adapted.dtype == dtype
    assert_non_trivial(adapted, base)
    # Close to the same adapter on the fp32 base, within half-precision rounding (~1e-2 of logits ~0.4).
    full = restorelcc_model(architecture, "some_heads_k3")
    tolerance = 2e-2 if dtype == torch.bfloat16 else 3e-3
    torch.testing.assert_close(adapted.float(), logits(full, inputs), rtol=0, atol=tolerance)
    with model.disable_adapter():
        assert_same(logits(model, inputs), base)
    settings = {"max_new_tokens": 3, "do_sample": False, "pad_token_id": 0, "return_dict_in_generate": True}
    generated = model.generate(input_ids=inputs[:, :5], output_scores=True, **settings)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.merge_adapter()
    assert_same(logits(model, inputs), adapted)
    assert all(layer.get_base_layer().bias.dtype == dtype for layer in restorelcc_layers(model))
    generated_merged = model.generate(input_ids=inputs[:, :5], output_scores=True, **settings)
    assert torch.equal(generated.sequences, generated_merged.sequences)
    assert all(torch.equal(a, b) for a, b in zip(generated.scores, generated_merged.scores))
    # Training steps in half precision reach the fp32 adapter.
    model.unmerge_adapter()
    model.train()
    model(inputs, labels=inputs).loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_model_cast_to_half_after_wrapping_still_merges(architecture):
    # PEFT's fp16 merge check: wrap, cast everything (adapter included) to fp16, merge_and_unload.
    inputs = random_input_ids()
    model = restorelcc_model(architecture, "some_heads_k3").to(torch.float16)
    adapted = logits(model, inputs)
    assert adapted.dtype == torch.float16
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = model.merge_and_unload()
    assert_same(logits(merged, inputs), adapted)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_inference_mode_config_trains_nothing_and_gives_the_same_outputs(architecture):
    inputs = random_input_ids()
    trainable = restorelcc_model(architecture, "some_heads_k3")
    frozen = restorelcc_model(architecture, "some_heads_k3", inference_mode=True)
    assert not any(parameter.requires_grad for parameter in frozen.parameters())
    assert any(parameter.requires_grad for parameter in trainable.parameters())
    assert_same(logits(frozen, inputs), logits(trainable, inputs))


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_modules_to_save_train_save_and_reload(architecture, tmp_path):
    inputs = random_input_ids()
    model = restorelcc_model(architecture, "some_heads_k3", modules_to_save=["lm_head"])
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(inputs, labels=inputs).loss.backward()
    optimizer.step()
    model.eval()
    trained = logits(model, inputs)
    with model.disable_adapter():
        assert_same(logits(model, inputs), base_logits(architecture, inputs))
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make_tiny_model(architecture), tmp_path).eval()
    assert_same(logits(loaded, inputs), trained)
    # The trained lm_head copy matters: without it the output differs.
    assert_non_trivial(trained, logits(restorelcc_model(architecture, "some_heads_k3"), inputs))


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_pickle_deepcopy_and_status(architecture):
    inputs = random_input_ids()
    model = restorelcc_model(architecture, "bias_only")
    adapted = logits(model, inputs)
    assert_same(logits(pickle.loads(pickle.dumps(model)), inputs), adapted)
    assert_same(logits(copy.deepcopy(model), inputs), adapted)
    status = model.get_model_status()
    assert status.peft_types == {"default": "RESTORELCC"} and status.num_adapter_layers == 2
    assert status.trainable_params == 3 * 8 and status.enabled is True and status.merged_adapters == []
    model.merge_adapter()
    assert model.get_model_status().merged_adapters == ["default"]
    assert {layer.module_type for layer in model.get_layer_status()} == {"restorelcc.Linear"}


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_hooks_on_the_wrapped_projection_still_fire(architecture):
    # Calibration hooks the projection under the adapter (its raw head inputs): the adapter must call it.
    inputs = random_input_ids()
    model = restorelcc_model(architecture, "some_heads_k3")
    seen = []
    for layer in restorelcc_layers(model):
        layer.get_base_layer().register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[-1]))
    logits(model, inputs)
    assert seen == [layer.in_features for layer in restorelcc_layers(model)]


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_layers_to_transform_inputs_embeds_and_repeated_merge(architecture):
    inputs = random_input_ids()
    model = restorelcc_model(architecture, "all_heads", layers_to_transform=[1])
    assert [layer.layer_index for layer in restorelcc_layers(model)] == [1]
    adapted = logits(model, inputs)
    assert_non_trivial(adapted, base_logits(architecture, inputs))
    with torch.no_grad():
        from_embeddings = model(inputs_embeds=model.get_input_embeddings()(inputs)).logits
    assert_same(from_embeddings, adapted)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.merge_adapter()
        model.merge_adapter()  # PEFT warns that everything is merged already and changes nothing
    assert_same(logits(model, inputs), adapted)
    model.unmerge_adapter()
    assert_same(logits(model, inputs), adapted)
