"""bf16 and fp16 bases end to end: prune, calibrate, train (adapter in fp32), merge (one final rounding), evaluate."""

from __future__ import annotations

import pytest
import torch
from test_training import char_tokenizer
from tiny_models import make_tiny_model, random_input_ids

import peft_restorelcc
from peft_restorelcc.calibration import build_restorelcc_model, calibrate
from peft_restorelcc.evaluation.tasks import perplexity
from peft_restorelcc.io import load_model
from peft_restorelcc.pruning import measure_sparsity, prune_model
from peft_restorelcc.training.trainer import train_adapter
from peft_restorelcc.tuner.heads import projection_weight

HALF = [torch.bfloat16, torch.float16]
TEXTS = ["plain words make a short text for the tiny model.", "another line of text, with digits 123 and more."]


def tiny(dtype: torch.dtype):
    return make_tiny_model("llama").to(dtype)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_pruning_a_half_model_keeps_its_dtype_and_hits_the_target(dtype, method):
    model = tiny(dtype)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    report = prune_model(model, method, 0.5, calibration_input_ids=random_input_ids(4, 16), progress=False)
    assert report["overall_sparsity"] == pytest.approx(0.5, abs=1e-3)
    for name, parameter in model.named_parameters():
        assert parameter.dtype == dtype and torch.isfinite(parameter).all(), name
    if method == "wanda":  # Wanda only zeroes: every kept weight is bit-identical
        for name, parameter in model.named_parameters():
            kept = parameter != 0
            assert torch.equal(parameter[kept], before[name][kept]), name


FP32_UNIT_ROUNDOFF = 2.0**-24


def assert_within_fp32_summation_bound(summed: torch.Tensor, terms: torch.Tensor) -> None:
    """``summed`` is an fp32 sum over dim 0 of ``terms`` (exact float64 values), within the rounding error bound.

    A floating-point sum of n terms, in any order or blocking (BLAS kernels differ between CPUs), is off from the
    exact sum by at most gamma_n * sum |terms|, gamma_n = n u / (1 - n u), u = 2^-24 for fp32 (Higham, Accuracy and
    Stability of Numerical Algorithms, 2nd ed., eq. 4.4). The terms here are exact in fp32 (a product of two bf16
    numbers has at most 16 significant bits), so the sum is the only rounding. A bf16 accumulator (u = 2^-8) breaks
    this bound by orders of magnitude; that is what the check is for.
    """
    num_terms = terms.shape[0]
    gamma = num_terms * FP32_UNIT_ROUNDOFF / (1 - num_terms * FP32_UNIT_ROUNDOFF)
    error = (summed.double() - terms.sum(0)).abs()
    bound = gamma * terms.abs().sum(0)
    worst = (error / bound).max().item()
    assert worst <= 1.0, f"the sum is off by {worst:.3g}x the fp32 summation bound"


def bf16_tokens() -> torch.Tensor:
    return (torch.randn(4096, 8, generator=torch.Generator().manual_seed(0)) + 3).to(torch.bfloat16)


def test_wanda_and_sparsegpt_statistics_of_bf16_inputs_are_accumulated_in_fp32():
    """Over 4,096 bf16 tokens the statistics stay within the fp32 summation bound of the float64 truth."""
    from peft_restorelcc.pruning import _InputStatistics

    linear = torch.nn.Linear(8, 4).to(torch.bfloat16)
    inputs = bf16_tokens()
    with _InputStatistics({"linear": linear}, need_hessian=True) as stats, torch.no_grad():
        linear(inputs)
    exact = inputs.double()
    assert stats.sq_norms["linear"].dtype == torch.float32
    assert stats.hessians["linear"].dtype == torch.float32
    assert_within_fp32_summation_bound(stats.sq_norms["linear"], exact**2)
    outer_products = exact[:, :, None] * exact[:, None, :]  # (tokens, 8, 8): the Hessian is their sum
    assert_within_fp32_summation_bound(stats.hessians["linear"], outer_products)


def test_a_bf16_running_sum_breaks_the_fp32_summation_bound():
    """The negative case: the check above fails for the accumulator it exists to catch."""
    exact = bf16_tokens().double()
    running = torch.zeros(8, 8, dtype=torch.bfloat16)
    for token in bf16_tokens():
        running = running + torch.outer(token, token)  # bf16 + bf16 rounds to bf16 at every step
    with pytest.raises(AssertionError, match="fp32 summation bound"):
        assert_within_fp32_summation_bound(running.float(), exact[:, :, None] * exact[:, None, :])


@pytest.fixture(scope="module")
def bf16_pipeline(tmp_path_factory):
    """Dense and Wanda-pruned tiny Llama in bf16, calibrated with both as loaders, adapter trained 3 steps."""
    tokenizer = char_tokenizer()
    dense = tiny(torch.bfloat16)
    pruned = tiny(torch.bfloat16)
    prune_model(pruned, "wanda", 0.5, calibration_input_ids=random_input_ids(4, 16), progress=False)
    prompts = [text[:30] for text in TEXTS * 4]
    components = calibrate(dense, pruned, prompts, tokenizer, strategy="lost_norm", progress=False)
    peft_model = build_restorelcc_model(pruned, components, num_heads=4, init="lost")
    untrained = {name: p.detach().clone() for name, p in peft_model.named_parameters() if p.requires_grad}
    ids = tokenizer(TEXTS * 4, add_special_tokens=False)["input_ids"]
    dataset = [{"input_ids": row[:24], "labels": row[:24]} for row in ids]
    metrics = train_adapter(
        peft_model, tokenizer, dataset, tmp_path_factory.mktemp("bf16") / "adapter", max_steps=3, batch_size=4,
        learning_rate=1e-2, save_steps=100, disable_tqdm=True, device="cpu",
    )  # fmt: skip
    return {
        "tokenizer": tokenizer,
        "components": components,
        "peft_model": peft_model,
        "untrained": untrained,
        "metrics": metrics,
    }


def test_calibration_of_bf16_models_is_fp32_and_finite(bf16_pipeline):
    components = bf16_pipeline["components"]
    for tensor in (components.basis, components.singular_values, components.mean):
        assert tensor.dtype == torch.float32 and torch.isfinite(tensor).all()
    # The basis is orthonormal (the SVD ran in float64, not in bf16).
    gram = components.basis @ components.basis.transpose(1, 2)
    torch.testing.assert_close(gram, torch.eye(gram.shape[-1]).expand_as(gram), atol=1e-5, rtol=0)


def test_training_moves_the_fp32_adapter_and_leaves_the_bf16_base(bf16_pipeline):
    model = bf16_pipeline["peft_model"]
    assert bf16_pipeline["metrics"]["steps"] == 3
    assert torch.isfinite(torch.tensor(bf16_pipeline["metrics"]["train_loss"]))
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            assert parameter.dtype == torch.float32, name
            assert not torch.equal(parameter, bf16_pipeline["untrained"][name]), name
        else:
            assert parameter.dtype == torch.bfloat16, name


def test_merge_rounds_once_and_keeps_every_zero(bf16_pipeline):
    model = bf16_pipeline["peft_model"]
    layers = peft_restorelcc.restorelcc_layers(model)
    # The merged bias is the fp32 computation cast once to bf16, nothing rounded before.
    expected = {}
    for layer in layers:
        weight = projection_weight(layer.get_base_layer()).detach()
        expected[layer.layer_index] = (weight.float() @ layer.input_shift(["default"]).detach().float()).to(
            weight.dtype
        )
    with torch.no_grad():
        unmerged = model(random_input_ids()).logits.float()
    zeros_before = measure_sparsity(model.get_base_model())["zeros"]
    for layer in layers:
        layer.merge()
        bias = layer.get_base_layer().bias
        assert bias.dtype == torch.bfloat16
        assert torch.equal(bias, expected[layer.layer_index])
    assert measure_sparsity(model.get_base_model())["zeros"] == zeros_before
    with torch.no_grad():
        merged = model(random_input_ids()).logits.float()
    # Merged and unmerged differ by bf16 rounding only (the unmerged path adds W @ shift in bf16).
    torch.testing.assert_close(merged, unmerged, atol=0.05, rtol=0.02)
    for layer in layers:
        layer.unmerge()


def test_perplexity_of_a_bf16_model_is_close_to_fp32(bf16_pipeline):
    tokenizer = bf16_pipeline["tokenizer"]
    half = tiny(torch.bfloat16)
    full = tiny(torch.bfloat16).float()  # the same bf16 weights, evaluated in fp32
    assert perplexity(half, tokenizer, TEXTS) == pytest.approx(perplexity(full, tokenizer, TEXTS), rel=0.02)


@pytest.mark.parametrize("dtype", HALF)
def test_load_model_keeps_the_checkpoint_dtype(dtype, tmp_path):
    tiny(dtype).save_pretrained(tmp_path / "model")
    assert load_model(tmp_path / "model").dtype == dtype
    assert load_model(tmp_path / "model", dtype=torch.float32).dtype == torch.float32
