"""Pruning: exact sparsity, N:M, error ordering of the methods, saving, structured pruning, input validation."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tiny_models import make_tiny_model, random_input_ids
from transformers import AutoModelForCausalLM

from peft_restorelcc.pruning import (
    REPORT_FILE,
    check_nm_pattern,
    find_decoder_layers,
    hold_pruned_weights_at_zero,
    load_report,
    magnitude_prune_weight,
    measure_sparsity,
    prune_model,
    save_pruned,
    sparsegpt_prune_weight,
    structured_prune_heads,
    wanda_prune_weight,
)
from peft_restorelcc.pruning import _all_projections as all_projections  # noqa: I001 (test-only access)

METHODS = ("magnitude", "wanda", "sparsegpt")


def _calibration(samples: int = 8, length: int = 16) -> torch.Tensor:
    return random_input_ids(samples, length, seed=3)


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def _out_in(module: torch.nn.Module) -> torch.Tensor:
    """Weight as out x in (GPT-2's Conv1D stores in x out)."""
    return module.weight.t() if type(module).__name__ == "Conv1D" else module.weight


# --- exact sparsity ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_every_layer_hits_the_target_and_nothing_else_changes(method: str, arch: str) -> None:
    model = make_tiny_model(arch)
    before = _state(model)
    report = prune_model(model, method, 0.5, calibration_input_ids=_calibration(), progress=False)

    projections = {name: module for block in all_projections(model) for name, module in block.items()}
    assert set(report["layers"]) == set(projections)
    assert all(value == 0.5 for value in report["layers"].values())
    assert report["overall_sparsity"] == 0.5
    assert report["method"] == method and report["sparsity_target"] == 0.5 and report["pattern"] is None
    assert report["seconds"] >= 0
    if method != "sparsegpt":  # magnitude and Wanda compare within rows: every row is exactly half zeros
        for module in projections.values():
            assert ((_out_in(module) == 0).sum(dim=1) == _out_in(module).shape[1] // 2).all()
    # Embeddings, norms and lm_head stay as they were; only projection weights inside the blocks changed.
    changed = {name for name, tensor in model.state_dict().items() if not torch.equal(tensor, before[name])}
    assert changed and changed <= {name + ".weight" for name in projections}
    assert measure_sparsity(model)["layers"] == report["layers"]


@pytest.mark.parametrize("method", METHODS)
def test_uneven_sparsity_is_exact_per_layer(method: str) -> None:
    model = make_tiny_model("llama")
    report = prune_model(model, method, 0.3, calibration_input_ids=_calibration(), progress=False)
    for name, module in (item for block in all_projections(model) for item in block.items()):
        rows, cols = module.weight.shape
        expected = rows * round(cols * 0.3) if method != "sparsegpt" else round(rows * cols * 0.3)
        assert report["layers"][name] == pytest.approx(expected / (rows * cols))


# --- N:M --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_nm_pattern_holds_in_every_group(method: str, pattern: str) -> None:
    model = make_tiny_model("llama")
    report = prune_model(model, method, None, pattern=pattern, calibration_input_ids=_calibration(), progress=False)
    n, m = map(int, pattern.split(":"))
    assert report["pattern"] == pattern and report["sparsity_target"] == 0.5
    for block in all_projections(model):
        for module in block.values():
            groups = module.weight.reshape(-1, m)
            assert ((groups != 0).sum(dim=1) == n).all()  # exactly N kept: pruning never removes more than asked
            assert check_nm_pattern(module.weight, n, m)
    assert report["overall_sparsity"] == 0.5


def test_nm_pattern_on_conv1d_runs_along_inputs() -> None:
    model = make_tiny_model("gpt2")
    prune_model(model, "wanda", 0.5, pattern=(2, 4), calibration_input_ids=_calibration(), progress=False)
    for block in all_projections(model):
        for module in block.values():
            assert check_nm_pattern(module.weight.t(), 2, 4)


def test_check_nm_pattern() -> None:
    weight = torch.tensor([[1.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0, 3.0]])
    assert check_nm_pattern(weight, 2, 4)
    assert check_nm_pattern(weight, 4, 8)
    assert not check_nm_pattern(weight, 1, 4)
    assert not check_nm_pattern(torch.ones(2, 6), 2, 4)  # 6 is not a multiple of 4
    with pytest.raises(ValueError, match="0 < N < M"):
        check_nm_pattern(weight, 4, 4)


# --- error ordering: SparseGPT < Wanda < magnitude --------------------------------------------------------------


def _outlier_inputs(tokens: int, width: int, seed: int) -> torch.Tensor:
    """Inputs with a few high-magnitude feature dims and correlated features, as in real LLM activations."""
    generator = torch.Generator().manual_seed(seed)
    scales = torch.exp(torch.randn(width, generator=generator))
    mixing = torch.eye(width) + torch.randn(width, width, generator=generator) / math.sqrt(width)
    return (torch.randn(tokens, width, generator=generator) @ mixing) * scales


@pytest.mark.parametrize("pattern", [None, (2, 4)])
def test_reconstruction_error_orders_the_methods(pattern: tuple[int, int] | None) -> None:
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(48, 160, generator=generator)  # 160 columns: two SparseGPT blocks, the second partial
    inputs = _outlier_inputs(512, 160, seed=1)
    reference = inputs @ weight.t()

    def error(pruned: torch.Tensor) -> float:
        return float((inputs @ pruned.t() - reference).norm())

    magnitude = weight.clone()
    magnitude_prune_weight(magnitude, 0.5, pattern)
    wanda = weight.clone()
    wanda_prune_weight(wanda, (inputs * inputs).sum(dim=0), 0.5, pattern)
    sparsegpt = weight.clone()
    sparsegpt_prune_weight(sparsegpt, 2 * inputs.t() @ inputs / inputs.shape[0], 0.5, pattern)

    for pruned in (magnitude, wanda, sparsegpt):
        assert (pruned == 0).float().mean() == 0.5
    assert error(sparsegpt) < error(wanda) < error(magnitude)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_layer_output_error_below_magnitude_in_a_model(method: str) -> None:
    """On the first block (whose inputs are the same for every method) each projection's ||WX - W'X|| drops."""

    def outlier_model() -> torch.nn.Module:
        model = make_tiny_model("llama", hidden_size=64, intermediate_size=128, num_attention_heads=4)
        generator = torch.Generator().manual_seed(5)
        with torch.no_grad():  # real LLMs have outlier feature dims; the random init has none
            for block in model.model.layers:
                block.input_layernorm.weight.copy_(torch.exp(torch.randn(64, generator=generator)))
                block.post_attention_layernorm.weight.copy_(torch.exp(torch.randn(64, generator=generator)))
        return model

    calibration = _calibration(16, 32)
    dense = outlier_model()
    inputs: dict[str, torch.Tensor] = {}
    first = all_projections(dense)[0]

    def recorder(name: str):
        def hook(_module: torch.nn.Module, args: tuple, _output: torch.Tensor) -> None:
            inputs[name] = args[0].reshape(-1, args[0].shape[-1])

        return hook

    handles = [module.register_forward_hook(recorder(name)) for name, module in first.items()]
    with torch.no_grad():
        dense(calibration)
    for handle in handles:
        handle.remove()

    errors = {}
    for candidate in ("magnitude", method):
        model = outlier_model()
        prune_model(model, candidate, 0.5, calibration_input_ids=calibration, batch_size=16, progress=False)
        pruned = all_projections(model)[0]
        errors[candidate] = {
            name: float((inputs[name] @ (pruned[name].weight - first[name].weight).t()).detach().norm())
            for name in first
        }
    for name in first:
        assert errors[method][name] < errors["magnitude"][name], name


def test_padding_is_left_out_of_the_statistics() -> None:
    """Left padding with different pad tokens (masked out) must not change what Wanda or SparseGPT prune."""
    ids = random_input_ids(4, 12, seed=7)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    mask[3, :3] = 0
    other = ids.clone()
    other[mask == 0] = 5
    for method in ("wanda", "sparsegpt"):
        first, second = make_tiny_model("llama"), make_tiny_model("llama")
        prune_model(first, method, 0.5, calibration_input_ids=ids, attention_mask=mask, batch_size=2, progress=False)
        prune_model(second, method, 0.5, calibration_input_ids=other, attention_mask=mask, batch_size=2, progress=False)
        for name, tensor in first.state_dict().items():
            torch.testing.assert_close(tensor, second.state_dict()[name], rtol=1e-5, atol=1e-6)


# --- training a pruned model ------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_held_pruned_weights_stay_zero_while_the_rest_trains(arch: str, weight_decay: float) -> None:
    model = make_tiny_model(arch)
    prune_model(model, "wanda", 0.5, calibration_input_ids=_calibration(), progress=False)
    before = _state(model)
    zeros_before = {name: _out_in(module) == 0 for block in all_projections(model) for name, module in block.items()}
    handles = hold_pruned_weights_at_zero(model)
    assert len(handles) == len(zeros_before)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=weight_decay)
    ids = random_input_ids()
    for _ in range(3):
        model(ids, labels=ids).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
    for block in all_projections(model):
        for name, module in block.items():
            weight = _out_in(module)
            assert torch.equal(weight == 0, zeros_before[name]), name  # the same weights are zero, no more, no fewer
    assert measure_sparsity(model)["overall_sparsity"] == pytest.approx(0.5)
    changed = [name for name, tensor in model.state_dict().items() if not torch.equal(tensor, before[name])]
    assert any("embed" in name or "wte" in name for name in changed) and len(changed) > len(zeros_before)

    # Without the hooks, the same training fills the pruned weights in.
    for handle in handles:
        handle.remove()
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    assert measure_sparsity(model)["overall_sparsity"] < 0.4


# --- saving -----------------------------------------------------------------------------------------------------


def test_save_and_reload_give_identical_outputs(tmp_path) -> None:
    model = make_tiny_model("llama")
    report = prune_model(model, "sparsegpt", None, pattern="2:4", calibration_input_ids=_calibration(), progress=False)
    output = save_pruned(model, None, tmp_path / "pruned", report)
    assert (output / "model.safetensors").is_file() and (output / REPORT_FILE).is_file()
    assert json.loads((output / REPORT_FILE).read_text())["pattern"] == "2:4"
    reloaded = AutoModelForCausalLM.from_pretrained(output).eval()
    ids = random_input_ids()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert measure_sparsity(reloaded) == measure_sparsity(model)
    assert [p.name for p in tmp_path.iterdir()] == ["pruned"]  # no staging directory left behind

    with pytest.raises(ValueError, match="not empty"):
        save_pruned(model, None, output, report)


def test_failed_save_leaves_nothing(tmp_path) -> None:
    model = make_tiny_model("llama")
    with pytest.raises(TypeError):
        save_pruned(model, None, tmp_path / "out", {"not json": object()})
    assert list(tmp_path.iterdir()) == []


# --- structured -------------------------------------------------------------------------------------------------


def _o_proj_inputs(model: torch.nn.Module, ids: torch.Tensor) -> list[torch.Tensor]:
    captured: list[torch.Tensor] = []
    handles = [
        block.self_attn.o_proj.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
        for block in model.model.layers
    ]
    with torch.no_grad():
        model(ids)
    for handle in handles:
        handle.remove()
    return captured


@pytest.mark.parametrize(
    ("arch", "overrides", "heads_after", "kv_after", "with_calibration"),
    [
        ("llama", {}, 2, 2, False),  # GQA 4 heads / 2 groups: one query head per group goes, groups stay
        ("llama", {}, 2, 2, True),  # same, heads ranked by calibration activations
        ("llama", {"num_key_value_heads": 4}, 2, 2, True),  # MHA: whole heads (q, k, v) go
        ("qwen2", {}, 2, 2, False),  # q/k/v biases are sliced too
        ("gemma", {}, 2, 1, True),  # one KV group, explicit head_dim
    ],
)
def test_structured_pruning_reloads_in_stock_transformers(
    tmp_path, arch: str, overrides: dict, heads_after: int, kv_after: int, with_calibration: bool
) -> None:
    dense = make_tiny_model(arch, **overrides)
    model = make_tiny_model(arch, **overrides)
    ids = random_input_ids()
    calibration = _calibration() if with_calibration else None
    report = structured_prune_heads(model, 0.5, 0.25, calibration_input_ids=calibration)

    assert report["importance"] == ("activation" if with_calibration else "magnitude")
    assert model.config.num_attention_heads == heads_after and model.config.num_key_value_heads == kv_after
    assert model.config.intermediate_size == 48 and model.config.head_dim == 8
    assert report["kept_channels"] == {0: 48, 1: 48}
    assert report["parameters_after"] < report["parameters_before"]
    for layer, heads in report["kept_heads"].items():
        assert heads == sorted(heads) and len(heads) == heads_after
        dense_kv = report["num_key_value_heads"]["before"]
        if dense_kv < 4:  # GQA: every group keeps the same number of its own query heads
            per_group = 4 // dense_kv
            assert [h // per_group for h in heads] == [
                g for g in range(dense_kv) for _ in range(heads_after // dense_kv)
            ]
        else:  # MHA: the key/value heads go with their query heads
            assert report["kept_kv_heads"][layer] == heads
        assert len(report["kept_channel_indices"][layer]) == 48

    # Head j of the pruned first layer is dense head kept_heads[0][j]: the first layer's inputs are the same.
    head_dim = 8
    pruned_heads = _o_proj_inputs(model, ids)[0].reshape(*ids.shape, heads_after, head_dim)
    dense_heads = _o_proj_inputs(dense, ids)[0].reshape(*ids.shape, 4, head_dim)
    torch.testing.assert_close(pruned_heads, dense_heads[:, :, report["kept_heads"][0]])

    save_pruned(model, None, tmp_path / "small", {"method": "structured", "structured": report})
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "small").eval()
    assert reloaded.config.num_attention_heads == heads_after
    assert sum(p.numel() for p in reloaded.parameters()) == report["parameters_after"]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    loaded = load_report(tmp_path / "small")
    assert loaded["structured"]["kept_heads"] == report["kept_heads"]  # integer layer keys survive JSON


def test_structured_rejects_unsupported_architecture_untouched() -> None:
    model = make_tiny_model("gpt2")
    before = _state(model)
    with pytest.raises(ValueError, match="does not support model_type='gpt2'"):
        structured_prune_heads(model, 0.5, 0.5)
    assert all(torch.equal(tensor, before[name]) for name, tensor in model.state_dict().items())


@pytest.mark.parametrize(
    ("heads", "ffn", "message"),
    [(1.0, 0.0, "outside"), (-0.1, 0.0, "outside"), (0.0, 1.5, "outside"), (0.8, 0.0, "all 2 query heads")],
)
def test_structured_bad_fractions(heads: float, ffn: float, message: str) -> None:
    model = make_tiny_model("llama")
    before = _state(model)
    with pytest.raises(ValueError, match=message):
        structured_prune_heads(model, heads, ffn)
    assert all(torch.equal(tensor, before[name]) for name, tensor in model.state_dict().items())
    assert model.config.num_attention_heads == 4


# --- validation -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(method="obs", sparsity=0.5), "Unknown pruning method 'obs'"),
        (dict(method="magnitude", sparsity=1.0), r"outside \[0, 1\)"),
        (dict(method="magnitude", sparsity=-0.1), r"outside \[0, 1\)"),
        (dict(method="magnitude", sparsity=None), "sparsity is required"),
        (dict(method="magnitude", sparsity=None, pattern="4:4"), "0 < N < M"),
        (dict(method="magnitude", sparsity=None, pattern="4:2"), "0 < N < M"),
        (dict(method="magnitude", sparsity=None, pattern="2-4"), "Malformed"),
        (dict(method="magnitude", sparsity=None, pattern="2:4:8"), "Malformed"),
        (dict(method="magnitude", sparsity=0.3, pattern="2:4"), "disagrees with pattern 2:4"),
        (dict(method="magnitude", sparsity=None, pattern="2:64"), "not a multiple of M=64"),
        (dict(method="wanda", sparsity=0.5), "wanda needs calibration inputs"),
        (dict(method="sparsegpt", sparsity=0.5), "sparsegpt needs calibration inputs"),
        (dict(method="wanda", sparsity=0.5, calibration_input_ids=torch.ones(4)), "2-D LongTensor"),
        (
            dict(
                method="wanda",
                sparsity=0.5,
                calibration_input_ids=torch.ones(2, 4, dtype=torch.long),
                attention_mask=torch.ones(2, 5),
            ),
            "attention_mask shape",
        ),
    ],
)
def test_bad_input_raises_and_leaves_the_model_unchanged(kwargs: dict, message: str) -> None:
    model = make_tiny_model("llama")
    before = _state(model)
    with pytest.raises(ValueError, match=message):
        prune_model(model, progress=False, **kwargs)
    assert all(torch.equal(tensor, before[name]) for name, tensor in model.state_dict().items())


def test_model_without_decoder_layers_is_rejected() -> None:
    model = torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.Linear(8, 8))
    with pytest.raises(ValueError, match="Cannot find the decoder layers"):
        prune_model(model, "magnitude", 0.5)
    with pytest.raises(ValueError, match="Cannot find the decoder layers"):
        find_decoder_layers(model)


def test_zero_sparsity_is_a_no_op() -> None:
    model = make_tiny_model("opt")
    before = _state(model)
    report = prune_model(model, "sparsegpt", 0.0, calibration_input_ids=_calibration(), progress=False)
    assert all(torch.equal(tensor, before[name]) for name, tensor in model.state_dict().items())
    assert report["overall_sparsity"] == 0.0
