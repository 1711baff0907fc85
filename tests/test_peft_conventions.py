"""PEFT's conventions for a tuner, each checked the way PEFT's own tests check them (tests/test_initialization.py,
tests/test_custom_models.py and tests/testing_common.py in huggingface/peft):

- ``init_weights``: True (default) is the identity, False a random non-identity adapter, "gaussian" the paper's init;
- models without a transformers config (plain ``nn.Module``s, as in PEFT's custom-model tests);
- ``autocast_adapter_dtype`` and ``low_cpu_mem_usage`` (adapter fp32 by default, the same bits either way);
- ``layers_to_transform`` intersected with explicit heads, ``exclude_modules`` as in LoRA.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import PeftModel, get_peft_model
from tiny_models import make_tiny_model, random_input_ids
from torch import nn

from peft_restorelcc import RestoreLCCConfig, RestoreLCCLayer, restorelcc_layers

HEADS = {0: [1], 1: [0, 3]}


def adapter_state(model) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items() if "restorelcc_" in name}


def wrapped_layers(model) -> dict[int, list[int]]:
    return {layer.layer_index: layer.head_indices.get("default", []) for layer in restorelcc_layers(model)}


class AttentionLike(nn.Module):
    """Not a transformers model: a value projection and an o_proj-like output projection, nothing else."""

    def __init__(self, hidden: int = 16) -> None:
        super().__init__()
        self.v_proj = nn.Linear(hidden, hidden)
        self.o_proj = nn.Linear(hidden, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.o_proj(torch.relu(self.v_proj(x)))


class PlainStack(nn.Module):
    """A plain nn.Module with two o_proj-like Linears under ``layers.<i>``, as in PEFT's custom-model tests."""

    def __init__(self, hidden: int = 16, num_layers: int = 2) -> None:
        super().__init__()
        self.layers = nn.ModuleList(AttentionLike(hidden) for _ in range(num_layers))
        self.head = nn.Linear(hidden, 4)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            X = layer(X)
        return self.head(X)


class Unnumbered(nn.Module):
    """Projections whose names carry no layer number (``first.o_proj``, ``second.o_proj``)."""

    def __init__(self, hidden: int = 16) -> None:
        super().__init__()
        self.first = AttentionLike(hidden)
        self.second = AttentionLike(hidden)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(X))


def plain_inputs() -> torch.Tensor:
    return torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(2))


# (a) init_weights polarity: PEFT's test_initialization checks that the default init leaves the output unchanged and
# that init_weights=False changes it.


@pytest.mark.parametrize("init_weights, identity", [(True, True), (False, False), ("gaussian", False)])
def test_init_weights_polarity_follows_peft(init_weights, identity):
    inputs = random_input_ids()
    reference = make_tiny_model("llama")(inputs).logits
    torch.manual_seed(0)
    model = get_peft_model(
        make_tiny_model("llama"), RestoreLCCConfig(heads=HEADS, init_weights=init_weights, init_std=0.1)
    ).eval()
    output = model(inputs).logits
    if identity:
        torch.testing.assert_close(output, reference, rtol=0, atol=0)
        assert all(not p.any() for n, p in model.named_parameters() if "restorelcc_" in n)
    else:
        assert (output - reference).abs().max() > 1e-3


def test_gaussian_is_the_papers_normal_init_and_false_is_wider():
    # Many heads, so the sample standard deviation is close to the one asked for.
    config = dict(heads=None, init_std=1e-3)
    stds = {}
    for init_weights in ("gaussian", False):
        torch.manual_seed(0)
        model = get_peft_model(make_tiny_model("llama"), RestoreLCCConfig(init_weights=init_weights, **config))
        values = torch.cat([p.flatten() for n, p in model.named_parameters() if "restorelcc_" in n])
        stds[init_weights] = float(values.std())
    assert 0.8e-3 < stds["gaussian"] < 1.2e-3
    assert 0.8 < stds[False] < 1.2


def test_gaussian_draws_what_the_old_default_drew():
    # Seeded runs of the paper recipe must not move: magnitudes first, then the bias, each N(0, init_std).
    base = make_tiny_model("llama")
    torch.manual_seed(0)
    model = get_peft_model(base, RestoreLCCConfig(heads={1: [2]}, init_weights="gaussian"))
    layer = next(restorelcc_layers(model))
    torch.manual_seed(0)
    expected_magnitude = torch.zeros(1, 8).normal_(0, 1e-3)
    expected_bias = torch.zeros(1, 8).normal_(0, 1e-3)
    assert torch.equal(layer.restorelcc_magnitude["default"], expected_magnitude)
    assert torch.equal(layer.restorelcc_bias["default"], expected_bias)


@pytest.mark.parametrize("bad", ["normal", "lost", 1.0])
def test_unknown_init_weights_is_refused(bad):
    with pytest.raises(ValueError, match="init_weights must be"):
        RestoreLCCConfig(init_weights=bad)


# (b) Models without a transformers config, as PEFT's custom-model tests use them.


@pytest.mark.parametrize("geometry", [{"num_heads": 4}, {"head_dim": 4}, {"num_heads": 4, "head_dim": 4}])
def test_plain_module_takes_the_head_layout_from_the_config(geometry, tmp_path):
    inputs = plain_inputs()
    torch.manual_seed(0)
    base = PlainStack().eval()
    reference = base(inputs)
    config = RestoreLCCConfig(target_modules=["o_proj"], heads={1: [0, 2]}, init_weights=False, **geometry)
    model = get_peft_model(base, config).eval()
    assert model.peft_config["default"].head_dim == 4
    assert wrapped_layers(model) == {1: [0, 2]}
    adapted = model(inputs)
    assert (adapted - reference).abs().max() > 1e-3
    model.save_pretrained(tmp_path)
    merged = model.merge_and_unload()
    torch.testing.assert_close(merged(inputs), adapted, rtol=1e-5, atol=1e-6)
    torch.manual_seed(0)
    loaded = PeftModel.from_pretrained(PlainStack().eval(), tmp_path)
    torch.testing.assert_close(loaded(inputs), adapted, rtol=0, atol=0)


def test_plain_module_without_a_head_layout_is_a_clear_error():
    with pytest.raises(ValueError, match="no transformers config .* num_heads"):
        get_peft_model(PlainStack(), RestoreLCCConfig(target_modules=["o_proj"]))


def test_plain_module_without_target_modules_is_a_clear_error():
    with pytest.raises(ValueError, match="Pass target_modules"):
        get_peft_model(PlainStack(), RestoreLCCConfig(num_heads=4))


def test_num_heads_must_divide_the_projection_and_agree_with_the_model():
    with pytest.raises(ValueError, match="does not divide"):
        get_peft_model(PlainStack(), RestoreLCCConfig(target_modules=["o_proj"], num_heads=3))
    # A transformers model: num_heads is checked against its config (4 heads of 8).
    get_peft_model(make_tiny_model("llama"), RestoreLCCConfig(num_heads=4))
    with pytest.raises(ValueError, match="head_dim=16, but the base model has head_dim=8"):
        get_peft_model(make_tiny_model("llama"), RestoreLCCConfig(num_heads=2))


def test_projections_without_a_layer_number_are_numbered_in_module_order():
    model = get_peft_model(
        Unnumbered(), RestoreLCCConfig(target_modules=["o_proj"], num_heads=2, heads={1: [1]}, init_weights=False)
    )
    (layer,) = restorelcc_layers(model)
    assert layer.layer_index == 1 and layer.head_indices["default"] == [1]
    assert isinstance(model.base_model.model.second.o_proj, RestoreLCCLayer)


# (c) Adapter dtype: PEFT's test_adapter_dtype_autocast and test_load_model_low_cpu_mem_usage.


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("autocast_adapter_dtype", [True, False])
@pytest.mark.parametrize("low_cpu_mem_usage", [False, True])
def test_adapter_dtype_autocast(dtype, autocast_adapter_dtype, low_cpu_mem_usage, tmp_path):
    expected = torch.float32 if autocast_adapter_dtype else dtype
    config = RestoreLCCConfig(heads=HEADS, init_weights=False)
    model = get_peft_model(
        make_tiny_model("llama").to(dtype), config, autocast_adapter_dtype=autocast_adapter_dtype
    )
    model.add_adapter("other", RestoreLCCConfig(heads={1: [2]}, init_weights=False))
    model.base_model._cast_adapter_dtype("other", autocast_adapter_dtype=autocast_adapter_dtype)
    adapter_tensors = {n: t for n, t in model.state_dict().items() if "restorelcc_" in n}
    assert adapter_tensors and all(t.dtype == expected for t in adapter_tensors.values())
    model.save_pretrained(tmp_path)

    loaded = PeftModel.from_pretrained(
        make_tiny_model("llama").to(dtype),
        tmp_path,
        autocast_adapter_dtype=autocast_adapter_dtype,
        low_cpu_mem_usage=low_cpu_mem_usage,
    )
    loaded.load_adapter(
        tmp_path / "other",
        adapter_name="other",
        autocast_adapter_dtype=autocast_adapter_dtype,
        low_cpu_mem_usage=low_cpu_mem_usage,
    )
    loaded_tensors = {n: t for n, t in loaded.state_dict().items() if "restorelcc_" in n}
    assert loaded_tensors.keys() == adapter_tensors.keys()
    for name, tensor in loaded_tensors.items():
        assert tensor.dtype == expected, name
        assert tensor.device.type != "meta", name
        assert torch.equal(tensor, adapter_tensors[name]), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_cpu_mem_usage_loads_the_same_adapter_bit_for_bit(dtype, tmp_path):
    inputs = random_input_ids()
    model = get_peft_model(make_tiny_model("llama").to(dtype), RestoreLCCConfig(heads=HEADS, init_weights=False))
    model.eval().save_pretrained(tmp_path)
    outputs, states = {}, {}
    for low_cpu_mem_usage in (False, True):
        loaded = PeftModel.from_pretrained(
            make_tiny_model("llama").to(dtype), tmp_path, low_cpu_mem_usage=low_cpu_mem_usage
        )
        states[low_cpu_mem_usage] = adapter_state(loaded)
        outputs[low_cpu_mem_usage] = loaded(inputs).logits
    assert all(t.dtype == torch.float32 for t in states[True].values())
    assert states[True].keys() == states[False].keys() == adapter_state(model).keys()
    for name, tensor in states[True].items():
        assert torch.equal(tensor, states[False][name]) and torch.equal(tensor, adapter_state(model)[name]), name
    assert torch.equal(outputs[True], outputs[False])
    assert torch.equal(outputs[True], model(inputs).logits)


# (d) layers_to_transform with explicit heads, exclude_modules (PEFT's test_tuners_utils / LoRA exclude tests).


def test_layers_to_transform_intersects_explicit_heads_with_a_warning():
    config = RestoreLCCConfig(heads={0: [1], 1: [0, 3]}, layers_to_transform=[1])
    with pytest.warns(UserWarning, match=r"heads names layers \[0\].*not compensated"):
        model = get_peft_model(make_tiny_model("llama"), config)
    assert wrapped_layers(model) == {1: [0, 3]}
    assert model.peft_config["default"].heads == {1: [0, 3]}


def test_layers_to_transform_inside_the_heads_gives_no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        model = get_peft_model(make_tiny_model("llama"), RestoreLCCConfig(heads={1: [2]}, layers_to_transform=[0, 1]))
    assert wrapped_layers(model) == {1: [2]}


def test_layers_to_transform_without_heads_wraps_every_head_of_those_layers():
    model = get_peft_model(make_tiny_model("llama"), RestoreLCCConfig(layers_to_transform=0))
    assert wrapped_layers(model) == {0: [0, 1, 2, 3]}


@pytest.mark.parametrize(
    "exclude_modules", [["model.layers.0.self_attn.o_proj"], r"model\.layers\.0\..*", ["layers.0.self_attn.o_proj"]]
)
def test_exclude_modules_works_as_in_lora(exclude_modules):
    model = get_peft_model(make_tiny_model("llama"), RestoreLCCConfig(exclude_modules=exclude_modules))
    assert wrapped_layers(model) == {1: [0, 1, 2, 3]}
    assert not isinstance(model.base_model.model.model.layers[0].self_attn.o_proj, RestoreLCCLayer)


def test_exclude_modules_drops_explicit_heads_of_excluded_layers_with_a_warning():
    config = RestoreLCCConfig(heads=HEADS, exclude_modules=["model.layers.1.self_attn.o_proj"])
    with pytest.warns(UserWarning, match=r"heads names layers \[1\]"):
        model = get_peft_model(make_tiny_model("llama"), config)
    assert wrapped_layers(model) == {0: [1]}


def test_exclude_modules_that_exclude_nothing_warn_as_in_peft():
    with pytest.warns(UserWarning, match="no modules were excluded"):
        get_peft_model(make_tiny_model("llama"), RestoreLCCConfig(exclude_modules=["not_a_module"]))


def test_exclude_modules_round_trips_through_the_saved_config(tmp_path):
    inputs = random_input_ids()
    model = get_peft_model(
        make_tiny_model("llama"), RestoreLCCConfig(exclude_modules=["layers.0.self_attn.o_proj"], init_weights=False)
    ).eval()
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make_tiny_model("llama"), tmp_path)
    assert wrapped_layers(loaded) == {1: [0, 1, 2, 3]}
    assert torch.equal(loaded(inputs).logits, model(inputs).logits)
