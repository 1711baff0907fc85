"""A planted loss: one head of the last layer of a tiny Llama (no GQA) loses its values entirely.

Only that head may show lost components; lost_norm must rank it first; its first lost direction must be the
leading direction of the actual differences; and the training-free "lost" init must shrink both the activation
error at that head and the logits error, on prompts not used for calibration.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import make_tiny_model, random_input_ids

from peft_restorelcc import restorelcc_layers
from peft_restorelcc.calibration import build_restorelcc_model, calibrate, capture_activations, refine_lost_init

LAYER, HEAD, HEAD_DIM = 1, 2, 8
ROW = 4 + HEAD  # stacked row of (layer 1, head 2): 4 heads per layer


def _models():
    dense = make_tiny_model("llama", num_key_value_heads=4)
    pruned = make_tiny_model("llama", num_key_value_heads=4)
    # Real LLM activations have a large common component (anisotropic embeddings); random tiny ones are centred.
    # Give both models the same shared embedding offset so that the heads' outputs have a mean worth restoring.
    offset = 0.05 * torch.randn(32, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        for model in (dense, pruned):
            model.model.embed_tokens.weight += offset
        pruned.model.layers[LAYER].self_attn.v_proj.weight[HEAD * HEAD_DIM : (HEAD + 1) * HEAD_DIM] = 0
    return dense, pruned


@pytest.fixture(scope="module")
def planted():
    dense, pruned = _models()
    prompts = random_input_ids(batch=48, length=10, seed=5).tolist()
    components = calibrate(dense, pruned, prompts, strategy="lost_norm", batch_size=16, progress=False)
    return dense, pruned, prompts, components


def test_only_the_damaged_head_loses_something(planted) -> None:
    _, _, _, components = planted
    others = [row for row in range(components.num_heads) if row != ROW]
    assert components.singular_values[others].max() < 1e-5
    assert components.singular_values[ROW, 0] > 1e-2
    assert components.ranking()[0].item() == ROW
    assert components.scores[others].max() < 1e-3 * components.scores[ROW]


def test_first_direction_is_the_leading_direction_of_the_differences(planted) -> None:
    dense, pruned, prompts, components = planted
    difference = capture_activations(dense, prompts, progress=False) - capture_activations(
        pruned, prompts, progress=False
    )
    leading = torch.linalg.svd(difference[:, ROW].double(), full_matrices=False).Vh[0].float()
    cosine = torch.nn.functional.cosine_similarity(components.basis[ROW, 0], leading, dim=0)
    assert cosine.abs() > 0.99


def test_all_tokens_mode_finds_the_same_head(planted) -> None:
    dense, pruned, prompts, _ = planted
    components = calibrate(dense, pruned, prompts, strategy="lost_norm", position="all", progress=False)
    assert components.ranking()[0].item() == ROW
    assert components.metadata["num_positions"] == 48 * 10


def test_lost_init_compensates_without_training(planted) -> None:
    dense, _, _, components = planted
    _, pruned = _models()  # a fresh copy: get_peft_model wraps it in place
    held_out = random_input_ids(batch=32, length=10, seed=99)
    with torch.no_grad():
        dense_logits = dense(held_out).logits
        pruned_logits = pruned(held_out).logits
    dense_heads = capture_activations(dense, held_out, progress=False)[:, ROW]
    pruned_heads = capture_activations(pruned, held_out, progress=False)[:, ROW]

    model = build_restorelcc_model(pruned, components, num_heads=1, init="lost")
    (layer,) = [layer for layer in restorelcc_layers(model) if "default" in layer.head_indices]
    assert (layer.layer_index, layer.head_indices["default"]) == (LAYER, [HEAD])
    torch.testing.assert_close(layer.restorelcc_basis["default"][0], components.basis[ROW])
    assert layer.restorelcc_bias["default"].abs().max() == 0
    added = layer.restorelcc_magnitude["default"][0] @ layer.restorelcc_basis["default"][0]
    torch.testing.assert_close(added, components.mean[ROW], atol=1e-6, rtol=1e-5)  # k = d: the whole mean

    with torch.no_grad():
        restored_logits = model(input_ids=held_out).logits
    head_error_before = (dense_heads - pruned_heads).norm()
    head_error_after = (dense_heads - (pruned_heads + added)).norm()
    assert head_error_after < 0.8 * head_error_before
    assert (dense_logits - restored_logits).norm() < 0.5 * (dense_logits - pruned_logits).norm()


def test_paper_init_keeps_small_random_magnitudes(planted) -> None:
    _, _, _, components = planted
    _, pruned = _models()
    model = build_restorelcc_model(pruned, components, num_heads=0.25, init="paper", num_components=3)
    layers = [layer for layer in restorelcc_layers(model) if "default" in layer.head_indices]
    assert sum(len(layer.head_indices["default"]) for layer in layers) == 2  # 25% of 8 heads
    for layer in layers:
        rows = components.rows_of(layer.layer_index, layer.head_indices["default"])
        torch.testing.assert_close(layer.restorelcc_basis["default"], components.basis[rows, :3])
        magnitude = layer.restorelcc_magnitude["default"]
        assert magnitude.shape == (len(rows), 3) and 0 < magnitude.abs().max() < 1e-2


def test_sequential_refinement_accounts_for_the_layers_below() -> None:
    dense, pruned = _models()
    rows = slice(HEAD * HEAD_DIM, (HEAD + 1) * HEAD_DIM)
    with torch.no_grad():
        # A second loss, in the first layer: its compensation changes what layer 1 receives; and layer 1's head is
        # only damaged (halved values) so that what it writes depends on what it receives.
        pruned.model.layers[0].self_attn.v_proj.weight[8:16] = 0
        pruned.model.layers[LAYER].self_attn.v_proj.weight[rows] = (
            0.5 * dense.model.layers[LAYER].self_attn.v_proj.weight[rows]
        )
    prompts = random_input_ids(batch=32, length=10, seed=5).tolist()
    components = calibrate(dense, pruned, prompts, strategy="lost_norm", batch_size=16, progress=False)
    model = build_restorelcc_model(pruned, components, num_heads=2, init="lost")
    assert model.peft_config["default"].heads == {0: [1], 1: [HEAD]}
    dense_mean = capture_activations(dense, prompts, progress=False).mean(0)

    def mean_residual() -> dict[int, float]:
        raw = capture_activations(model, prompts, progress=False).mean(0)  # heads before the adapter's shift
        residual = {}
        for layer in restorelcc_layers(model):
            if "default" in layer.head_indices:
                (head,) = layer.head_indices["default"]
                shift = layer.restorelcc_magnitude["default"][0] @ layer.restorelcc_basis["default"][0]
                row = 4 * layer.layer_index + head
                residual[layer.layer_index] = float((dense_mean[row] - raw[row] - shift).norm())
        return residual

    independent = mean_residual()
    assert independent[0] < 1e-5 and independent[1] > 1e-3  # layer 1's loss was measured without layer 0's fix
    remaining = refine_lost_init(model, dense, prompts, components=components, batch_size=16, progress=False)
    assert set(remaining) == {0, 1}
    refined = mean_residual()
    assert max(refined.values()) < 1e-5
