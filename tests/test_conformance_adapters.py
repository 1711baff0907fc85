"""PEFT's tuner contract, part 2: several adapters (set, delete, save selected, weighted), inject_adapter_in_model,
other tuners alongside, and RESTORELCC as a real ``peft.PeftType`` member."""

import json
import pickle
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from conformance import ARCHITECTURES, assert_non_trivial, assert_same, logits, randomize_basis, restorelcc_config
from peft import (
    LoraConfig,
    PeftConfig,
    PeftModel,
    PeftType,
    get_peft_model,
    get_peft_model_state_dict,
    inject_adapter_in_model,
)
from peft.tuners.tuners_utils import BaseTunerLayer
from tiny_models import make_tiny_model, random_input_ids

from peft_restorelcc import RestoreLCCConfig, RestoreLCCLayer, restorelcc_layers


def two_adapter_model(architecture: str):
    """``default`` on every head, ``other`` on a few heads of layer 1 only, both non-trivial and different."""
    torch.manual_seed(0)
    model = get_peft_model(make_tiny_model(architecture), restorelcc_config("all_heads")).eval()
    torch.manual_seed(1)
    model.add_adapter("other", restorelcc_config("components_only"))
    randomize_basis(model)
    return model


def single_adapter_logits(model, adapter_name: str, inputs) -> torch.Tensor:
    """What ``adapter_name`` alone gives: its tensors copied into a fresh single-adapter model."""
    config = model.peft_config[adapter_name]
    fresh = get_peft_model(make_tiny_model(model.base_model.model.config.model_type), config).eval()
    state = get_peft_model_state_dict(model, adapter_name=adapter_name)
    from peft import set_peft_model_state_dict

    set_peft_model_state_dict(fresh, state)
    return logits(fresh, inputs)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_two_adapters_switch_with_set_adapter(architecture):
    inputs = random_input_ids()
    model = two_adapter_model(architecture)
    first = logits(model, inputs)
    model.set_adapter("other")
    second = logits(model, inputs)
    assert_non_trivial(first, second)
    assert_same(second, single_adapter_logits(model, "other", inputs))
    # Only the active adapter trains.
    trainable = {name.rsplit(".", 1)[-1] for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"other"}
    model.set_adapter("default")
    assert_same(logits(model, inputs), first)
    assert_same(first, single_adapter_logits(model, "default", inputs))


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_delete_an_inactive_then_the_active_adapter(architecture):
    inputs = random_input_ids()
    model = two_adapter_model(architecture)
    with model.disable_adapter():
        base = logits(model, inputs)
    model.set_adapter("other")
    other = logits(model, inputs)
    model.delete_adapter("default")
    assert list(model.peft_config) == ["other"]
    for layer in restorelcc_layers(model):
        for container in (
            layer.restorelcc_basis,
            layer.restorelcc_magnitude,
            layer.restorelcc_bias,
            layer.head_indices,
        ):
            assert "default" not in container
    assert not any(".default" in key for key in model.state_dict())
    assert_same(logits(model, inputs), other)
    # Deleting the active (and last) adapter leaves the base (PEFT's PeftModel then has no adapter to run; its
    # base model does).
    model.delete_adapter("other")
    assert not any(layer.restorelcc_basis for layer in restorelcc_layers(model))
    assert_same(logits(model.base_model.model, inputs), base)


def test_deleting_the_active_adapter_activates_the_remaining_one():
    inputs = random_input_ids()
    model = two_adapter_model("llama")
    model.set_adapter("other")
    other = logits(model, inputs)
    model.set_adapter("default")
    default = logits(model, inputs)
    # "other" has no heads in layer 0, where PEFT looks for a successor first.
    model.delete_adapter("default")
    assert model.active_adapters == ["other"] and model.active_adapter == "other"
    assert all(layer.active_adapters == ["other"] for layer in restorelcc_layers(model))
    assert_same(logits(model, inputs), other)
    assert_non_trivial(default, other)


def test_merged_adapter_cannot_be_deleted():
    model = two_adapter_model("llama")
    model.merge_adapter()
    with pytest.raises(ValueError, match="merged"):
        model.delete_adapter("default")


@pytest.mark.parametrize("safe_serialization", [True, False])
def test_save_selected_adapters_and_load_each(tmp_path, safe_serialization):
    inputs = random_input_ids()
    model = two_adapter_model("gpt2")
    first = logits(model, inputs)
    model.set_adapter("other")
    second = logits(model, inputs)
    model.save_pretrained(tmp_path / "only_other", selected_adapters=["other"], safe_serialization=safe_serialization)
    saved = sorted(
        path.relative_to(tmp_path / "only_other").as_posix() for path in (tmp_path / "only_other").rglob("*.*")
    )
    weights_file = "adapter_model.safetensors" if safe_serialization else "adapter_model.bin"
    assert saved == ["README.md", "other/adapter_config.json", f"other/{weights_file}"]
    loaded = PeftModel.from_pretrained(make_tiny_model("gpt2"), tmp_path / "only_other" / "other", adapter_name="other")
    assert_same(logits(loaded, inputs), second)

    model.save_pretrained(tmp_path / "both", safe_serialization=safe_serialization)
    loaded = PeftModel.from_pretrained(make_tiny_model("gpt2"), tmp_path / "both").eval()
    loaded.load_adapter(tmp_path / "both" / "other", adapter_name="other")
    assert_same(logits(loaded, inputs), first)
    loaded.set_adapter("other")
    assert_same(logits(loaded, inputs), second)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_add_weighted_adapter_is_the_weighted_sum_of_compensations(architecture, tmp_path):
    inputs = random_input_ids()
    model = two_adapter_model(architecture)
    shifts = {}
    for name in ("default", "other"):
        shifts[name] = {layer.layer_index: layer.input_shift([name]) for layer in restorelcc_layers(model)}
    model.add_weighted_adapter(["default", "other"], [0.5, -2.0], adapter_name="mix")
    config = model.peft_config["mix"]
    assert config.peft_type == PeftType.RESTORELCC and not config.use_components
    assert not any(p.requires_grad for name, p in model.named_parameters() if name.endswith(".mix"))
    for layer in restorelcc_layers(model):
        default, other = shifts["default"][layer.layer_index], shifts["other"][layer.layer_index]
        expected = 0.5 * default + (0 if other is None else -2.0 * other)
        torch.testing.assert_close(layer.input_shift(["mix"]), expected, rtol=1e-6, atol=1e-7)
    # Weights 1 and 1: exactly what both adapters active together give.
    model.add_weighted_adapter(["default", "other"], [1.0, 1.0], adapter_name="sum")
    model.base_model.set_adapter(["default", "other"])
    both = logits(model, inputs)
    model.set_adapter("sum")
    torch.testing.assert_close(logits(model, inputs), both, rtol=1e-5, atol=1e-6)
    model.set_adapter("mix")
    mix = logits(model, inputs)
    assert_non_trivial(mix, both)
    model.save_pretrained(tmp_path, selected_adapters=["mix"])
    loaded = PeftModel.from_pretrained(make_tiny_model(architecture), tmp_path / "mix", adapter_name="mix")
    assert_same(logits(loaded, inputs), mix)


@pytest.mark.parametrize(
    "adapters, weights, name, message",
    [
        (["default"], [1.0, 2.0], "new", "one weight per adapter"),
        (["missing"], [1.0], "new", r"Adapters \['missing'\] do not exist"),
        (["default"], [1.0], "other", "'other' already exists"),
    ],
)
def test_add_weighted_adapter_refuses_bad_input(adapters, weights, name, message):
    model = two_adapter_model("llama")
    with pytest.raises(ValueError, match=message):
        model.add_weighted_adapter(adapters, weights, adapter_name=name)
    assert list(model.peft_config) == ["default", "other"]


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_inject_adapter_in_model_matches_get_peft_model(architecture):
    inputs = random_input_ids()
    torch.manual_seed(0)
    wrapped = get_peft_model(make_tiny_model(architecture), restorelcc_config("some_heads_k3")).eval()
    torch.manual_seed(0)
    injected = inject_adapter_in_model(restorelcc_config("some_heads_k3"), make_tiny_model(architecture))
    assert sum(isinstance(module, RestoreLCCLayer) for module in injected.modules()) == 2
    assert_same(logits(injected, inputs), logits(wrapped, inputs))
    state = get_peft_model_state_dict(injected)
    assert state.keys() == {key.removeprefix("base_model.model.") for key in get_peft_model_state_dict(wrapped)}


def test_peft_mixed_model_refuses_restorelcc_in_peft_words():
    # PEFT's PeftMixedModel only takes its own LoRA-like tuners; its check reads peft_type.value, which failed
    # with an AttributeError while peft_type was a plain string.
    with pytest.raises(ValueError, match="'RESTORELCC' is not compatible with the `PeftMixedModel`"):
        get_peft_model(make_tiny_model("llama"), restorelcc_config(), mixed=True)


def lora_model(architecture: str):
    targets = {"llama": ["up_proj"], "qwen2": ["up_proj"], "gpt2": ["mlp.c_fc"], "opt": ["fc1"]}[architecture]
    torch.manual_seed(0)
    config = LoraConfig(target_modules=targets, init_lora_weights=False)
    return inject_adapter_in_model(config, make_tiny_model(architecture), adapter_name="lora").eval()


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_lora_on_other_modules_alongside(architecture):
    # PEFT mixes tuner types only in PeftMixedModel (closed, see above); a LoRA injected on the MLP with RestoreLCC
    # on the attention output is what remains. Its output must be the LoRA model's with RestoreLCC's head shifts,
    # merging must keep it, and RestoreLCC's saved state must hold its own tensors only.
    inputs = random_input_ids()
    lora_only = logits(lora_model(architecture), inputs)
    assert_non_trivial(lora_only, logits(make_tiny_model(architecture), inputs))
    model = get_peft_model(lora_model(architecture), restorelcc_config("some_heads_k3")).eval()
    both = logits(model, inputs)
    assert_non_trivial(both, lora_only)
    reference = lora_model(architecture)
    for name, layer in model.named_modules():
        if isinstance(layer, RestoreLCCLayer):
            shift = layer.input_shift(["default"]).detach()
            target = reference.get_submodule(name.removeprefix("base_model.model."))
            target.register_forward_pre_hook(lambda module, args, shift=shift: (args[0] + shift,))
    torch.testing.assert_close(both, logits(reference, inputs), rtol=1e-5, atol=1e-6)
    assert all(key.split(".")[-1].startswith("restorelcc_") for key in get_peft_model_state_dict(model))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.merge_adapter()
    # PEFT's merge_adapter merges every tuner layer, LoRA's too: LoRA's weight merge rounds (1e-7 here).
    assert all(module.merged for module in model.modules() if isinstance(module, BaseTunerLayer))
    torch.testing.assert_close(logits(model, inputs), both, rtol=1e-5, atol=1e-6)


def test_peft_type_is_a_real_enum_member(tmp_path):
    config = restorelcc_config()
    assert config.peft_type is PeftType.RESTORELCC is PeftType("RESTORELCC")
    assert config.peft_type.value == "RESTORELCC" and PeftType.RESTORELCC in list(PeftType)
    model = get_peft_model(make_tiny_model("llama"), config)
    assert model.peft_type is PeftType.RESTORELCC
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "RESTORELCC"
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert type(loaded) is RestoreLCCConfig and loaded.peft_type is PeftType.RESTORELCC


def test_a_config_saved_with_the_plain_string_still_loads(tmp_path):
    # adapter_config.json files written before the enum member existed: the same JSON, the plain string.
    inputs = random_input_ids()
    model = get_peft_model(make_tiny_model("opt"), restorelcc_config("some_heads_k3")).eval()
    model.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    raw["peft_type"] = "RESTORELCC"
    raw["heads"] = {"0": [1], "1": [0, 3]}
    (tmp_path / "adapter_config.json").write_text(json.dumps(raw))
    loaded = PeftModel.from_pretrained(make_tiny_model("opt"), tmp_path)
    assert loaded.peft_config["default"].peft_type is PeftType.RESTORELCC
    assert_same(logits(loaded, inputs), logits(model, inputs))


def test_registration_is_idempotent_in_any_order(tmp_path):
    # Fresh interpreters: peft first (then a pickled config, whose unpickling imports the package and so registers
    # the member before it is looked up) or the package first; then repeated registration and a reload.
    (tmp_path / "config.pkl").write_bytes(pickle.dumps(restorelcc_config("some_heads_k3")))
    code = textwrap.dedent(
        """
        import importlib, pickle, sys
        if sys.argv[1] == "peft-first":
            import peft
            assert type(pickle.load(open(sys.argv[2], "rb"))).__name__ == "RestoreLCCConfig"
        import peft_restorelcc
        peft_restorelcc._register_with_peft(); peft_restorelcc._register_with_peft()
        importlib.reload(peft_restorelcc)
        import peft
        from peft import PeftType
        from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING as C, PEFT_TYPE_TO_TUNER_MAPPING as T
        from peft.mapping import PEFT_TYPE_TO_PREFIX_MAPPING as P, PEFT_TYPE_TO_MIXED_MODEL_MAPPING as M
        assert [m for m in PeftType if m.value == "RESTORELCC"] == [PeftType.RESTORELCC]
        assert C[PeftType.RESTORELCC] is C["RESTORELCC"] is peft_restorelcc.RestoreLCCConfig
        assert T["RESTORELCC"] is peft_restorelcc.RestoreLCCModel and P["RESTORELCC"] == "restorelcc_"
        assert "RESTORELCC" not in M
        print(peft_restorelcc.RestoreLCCConfig().peft_type.value)
        """
    )
    for order in ("peft-first", "package-first"):
        command = [sys.executable, "-c", code, order, str(tmp_path / "config.pkl")]
        result = subprocess.run(command, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-2000:]
        assert result.stdout.split() == ["RESTORELCC"]


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_mixed_adapter_batch_gives_each_sample_its_adapter(architecture):
    inputs = random_input_ids(batch=4)
    names = ["other", "__base__", "default", "other"]
    model = two_adapter_model(architecture)
    default = logits(model, inputs)
    model.set_adapter("other")
    other = logits(model, inputs)
    with model.disable_adapter():
        base = logits(model, inputs)
    assert_non_trivial(default, other)
    expected = torch.stack(
        [{"default": default, "other": other, "__base__": base}[name][i] for i, name in enumerate(names)]
    )
    with torch.no_grad():
        mixed = model(inputs, adapter_names=names).logits
    torch.testing.assert_close(mixed, expected, rtol=1e-5, atol=1e-6)
    # generate, with beam search repeating every sample.
    prompt = inputs[:2, :5]
    settings = {"max_new_tokens": 3, "num_beams": 2, "do_sample": False, "pad_token_id": 0}
    together = model.generate(input_ids=prompt, adapter_names=["default", "__base__"], **settings)
    model.set_adapter("default")
    alone = model.generate(input_ids=prompt[:1], **settings)
    with model.disable_adapter():
        alone_base = model.generate(input_ids=prompt[1:], **settings)
    assert torch.equal(together[:1], alone) and torch.equal(together[1:], alone_base)


@pytest.mark.parametrize(
    "names, prepare, message",
    [
        (["default", "typo"], "eval", "non-existing adapter.*typo"),
        (["default"], "eval", "one adapter name per sample"),
        (["default", "other"], "train", "training mode"),
        (["default", "other"], "merge", "merged"),
    ],
)
def test_mixed_adapter_batch_refuses_bad_input(names, prepare, message):
    model = two_adapter_model("llama")
    getattr(model, {"eval": "eval", "train": "train", "merge": "merge_adapter"}[prepare])()
    with pytest.raises(ValueError, match=message):
        model(random_input_ids(batch=2), adapter_names=names)
