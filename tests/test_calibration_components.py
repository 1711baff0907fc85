"""LostComponents: the main component, storage, and refusing another pruned model."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import make_tiny_model, random_input_ids

from peft_restorelcc.calibration import LostAccumulator, LostComponents, build_restorelcc_model, calibrate


def _pruned(seed_rows: slice = slice(0, 8)):
    model = make_tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight[:, seed_rows] = 0
    return model


@pytest.fixture(scope="module")
def measured():
    dense, pruned = make_tiny_model("llama"), _pruned()
    prompts = random_input_ids(batch=12, length=8, seed=4).tolist()
    components = calibrate(
        dense,
        pruned,
        prompts,
        strategy="random",
        kept_heads=None,
        pruning={"method": "magnitude", "sparsity": 0.5},
        pruned_name="tiny-pruned",
        progress=False,
    )
    return pruned, components


def test_main_component_is_the_papers_top_k_sum() -> None:
    generator = torch.Generator().manual_seed(1)
    lost = torch.randn(40, 2, 16, generator=generator) + torch.linspace(-1, 1, 16)
    accumulator = LostAccumulator("last", 2, 16)
    accumulator.add(lost, torch.zeros_like(lost))
    basis, singular, mean = accumulator.finish()
    components = LostComponents([0], [2], 16, basis, singular, mean)
    for head in range(2):
        u, s, vh = torch.linalg.svd(lost[:, head].double(), full_matrices=False)
        reference = sum(u[:, i].mean() * s[i] * vh[i] for i in range(10)).float()  # the paper's formula
        torch.testing.assert_close(components.main_components(10)[head], reference, atol=1e-5, rtol=1e-4)
    # With all d components the main component is the mean itself.
    torch.testing.assert_close(components.main_components(16), mean, atol=1e-5, rtol=1e-4)


def test_save_load_round_trip(measured, tmp_path) -> None:
    _, components = measured
    components.save(tmp_path / "lost")
    loaded = LostComponents.load(tmp_path / "lost")
    for name in ("basis", "singular_values", "mean", "output_metric", "scores"):
        torch.testing.assert_close(getattr(loaded, name), getattr(components, name))
    assert loaded.layer_indices == components.layer_indices == [0, 1]
    assert loaded.heads_per_layer == [4, 4] and loaded.head_dim == 8
    assert loaded.metadata["pruning"] == {"method": "magnitude", "sparsity": 0.5}
    assert loaded.metadata["pruned_model"] == "tiny-pruned" and loaded.metadata["num_samples"] == 12
    assert loaded.metadata["score_strategy"] == "random"
    assert torch.equal(loaded.ranking(), components.ranking())
    with pytest.raises(ValueError, match="not a lost-components directory"):
        LostComponents.load(tmp_path)


def test_components_refuse_another_pruned_model(measured) -> None:
    pruned, components = measured
    components.check_matches(pruned)
    components.check_matches(_pruned().to(torch.bfloat16))  # the same pruned model in another dtype
    with pytest.raises(ValueError, match="another pruned model"):
        components.check_matches(_pruned(slice(8, 16)))  # another head's columns pruned
    with pytest.raises(ValueError, match="another pruned model"):
        components.check_matches(make_tiny_model("llama"))  # the dense model
    with pytest.raises(ValueError, match="another pruned model"):
        build_restorelcc_model(make_tiny_model("llama"), components, num_heads=2)


def test_shapes_are_validated() -> None:
    with pytest.raises(ValueError, match="basis has shape"):
        LostComponents([0], [2], 4, torch.zeros(2, 4, 3), torch.zeros(2, 4), torch.zeros(2, 4))


def test_the_paper_recipe_asks_for_the_gaussian_init_by_name(measured) -> None:
    # init_weights=True became PEFT's identity init; the paper's N(0, init_std) must still be what the recipe uses.
    pruned, components = measured
    model = build_restorelcc_model(copy.deepcopy(pruned), components, num_heads=2, init="paper")
    assert model.peft_config["default"].init_weights == "gaussian"
    values = torch.cat([p.flatten() for n, p in model.named_parameters() if "restorelcc_" in n])
    assert values.abs().max() > 0 and values.std() < 1e-2
