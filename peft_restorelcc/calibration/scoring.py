"""Which heads to compensate: contrastive probing (the paper), the lost norm, or a seeded random baseline."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from .capture import probe_activations, single_threaded
from .components import MAIN_COMPONENTS_K, LostComponents

STRATEGIES = ("probe", "lost_norm", "random")


# ----------------------------------------------------------------------------------------------- the probe
def _check_probe_inputs(
    pruned_prompt: torch.Tensor,
    main_components: torch.Tensor,
    dense_correct: torch.Tensor,
    dense_wrong: torch.Tensor,
    train_fraction: float,
) -> None:
    """One ValueError line for inputs the probe cannot use (shapes, too few pairs, a bad split)."""
    if (
        pruned_prompt.dim() != 3
        or pruned_prompt.shape != dense_correct.shape
        or dense_correct.shape != dense_wrong.shape
    ):
        raise ValueError(
            "probe_scores expects pruned_prompt, dense_correct and dense_wrong of the same shape (pairs, heads, d); "
            f"got {tuple(pruned_prompt.shape)}, {tuple(dense_correct.shape)}, {tuple(dense_wrong.shape)}."
        )
    pairs, heads, d = pruned_prompt.shape
    if main_components.shape != (heads, d):
        raise ValueError(f"main_components must be ({heads}, {d}), got {tuple(main_components.shape)}.")
    if pairs < 2:
        raise ValueError(f"The probe needs at least 2 contrastive pairs (tens to hundreds are sensible), got {pairs}.")
    if not 0 < train_fraction < 1:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}.")


def probe_scores(
    pruned_prompt: torch.Tensor,
    main_components: torch.Tensor,
    dense_correct: torch.Tensor,
    dense_wrong: torch.Tensor,
    *,
    seed: int = 0,
    train_fraction: float = 0.7,
    steps: int = 200,
    lr: float = 0.05,
    weight_decay: float = 1e-3,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's contrastive probe, for all heads at once: ``(validation accuracy, validation loss)`` per head.

    Inputs are per pair ``m`` and head ``h``: the pruned model's activation at the prompt's last token
    ``(M, H, d)``, the head's main component ``(H, d)``, and the dense model's activations at the last token of
    prompt + correct answer and prompt + wrong answer ``(M, H, d)``. A pair gives a positive example
    ``[a_pruned + main, a_dense(correct)]`` and a negative one ``[a_pruned + main, a_dense(wrong)]``; pairs are
    split 70/30 (both members of a pair on the same side) with ``seed``. One logistic regression per head is
    trained on the stacked problem (weights ``H x 2d``): the loss is the sum of the per-head losses and Adam is
    coordinate-wise, so this is exactly one independent optimiser per head, in one tensor op per step.
    """
    _check_probe_inputs(pruned_prompt, main_components, dense_correct, dense_wrong, train_fraction)
    pairs, heads, _ = pruned_prompt.shape
    anchor = pruned_prompt.float() + main_components.float()
    positives = torch.cat([anchor, dense_correct.float()], dim=-1)  # (M, H, 2d)
    negatives = torch.cat([anchor, dense_wrong.float()], dim=-1)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(pairs, generator=generator)
    n_train = min(max(int(round(train_fraction * pairs)), 1), pairs - 1)
    train, valid = order[:n_train], order[n_train:]

    def split(index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = torch.cat([positives[index], negatives[index]]).transpose(0, 1)  # (H, 2n, 2d)
        labels = torch.cat([torch.ones(len(index)), torch.zeros(len(index))])
        return features, labels.expand(heads, -1)

    train_x, train_y = split(train)
    valid_x, valid_y = split(valid)
    # Standardise per head and feature on the training split: one learning rate then suits every head.
    center = train_x.mean(dim=1, keepdim=True)
    scale = train_x.std(dim=1, keepdim=True).clamp_min(1e-6)
    train_x = (train_x - center) / scale
    valid_x = (valid_x - center) / scale

    with single_threaded():  # hundreds of small steps: thread barriers would cost more than they save
        return _train_probes(train_x, train_y, valid_x, valid_y, steps, lr, weight_decay)


def _train_probes(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    valid_x: torch.Tensor,
    valid_y: torch.Tensor,
    steps: int,
    lr: float,
    weight_decay: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    heads, _, features = train_x.shape
    weight = torch.zeros(heads, features, requires_grad=True)
    bias = torch.zeros(heads, requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            logits = torch.einsum("hnf,hf->hn", train_x, weight) + bias[:, None]
            loss = F.binary_cross_entropy_with_logits(logits, train_y, reduction="none").mean(dim=1).sum()
            loss = loss + weight_decay * weight.pow(2).sum()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        logits = torch.einsum("hnf,hf->hn", valid_x, weight) + bias[:, None]
        accuracy = ((logits > 0).float() == valid_y).float().mean(dim=1)
        valid_loss = F.binary_cross_entropy_with_logits(logits, valid_y, reduction="none").mean(dim=1)
    return accuracy, valid_loss


def random_scores(num_heads: int, seed: int = 0) -> torch.Tensor:
    """Seeded uniform scores: the baseline that any real strategy must beat."""
    return torch.rand(num_heads, generator=torch.Generator().manual_seed(seed))


def score_heads(
    components: LostComponents,
    strategy: str = "probe",
    *,
    dense: Any = None,
    pruned: Any = None,
    pairs: Sequence[dict[str, str]] | None = None,
    tokenizer: Any = None,
    seed: int = 0,
    reduction: str = "mean",
    batch_size: int = 8,
    max_length: int | None = 512,
    kept_heads: dict[int, list[int]] | None = None,
    progress: bool = True,
) -> LostComponents:
    """Score every head of ``components``; returns a copy carrying the scores (higher = compensate first).

    ``"probe"`` (paper) needs the dense and pruned models (modules or loader callables, loaded one at a time),
    ``pairs`` ``[{"prompt", "correct", "wrong"}]`` and their tokenizer. ``"lost_norm"`` ranks by the size of the
    lost output as the layer sees it (``reduction`` ``"mean"`` or ``"rms"``, see
    :meth:`LostComponents.lost_norms`); ``"random"`` is a seeded baseline. Neither needs a model.
    """
    if strategy == "random":
        return components.with_scores(random_scores(components.num_heads, seed), "random")
    if strategy == "lost_norm":
        return components.with_scores(components.lost_norms(reduction), f"lost_norm:{reduction}")
    if strategy != "probe":
        raise ValueError(f"Unknown scoring strategy {strategy!r}; choose one of {STRATEGIES}.")
    if dense is None or pruned is None or not pairs:
        raise ValueError("The probe strategy needs dense=..., pruned=... and contrastive pairs=[...].")
    if kept_heads is None:
        kept_heads = components.metadata.get("kept_heads")
    activations = probe_activations(
        dense,
        pruned,
        pairs,
        tokenizer,
        kept_heads=kept_heads,
        batch_size=batch_size,
        max_length=max_length,
        target_modules=components.metadata.get("target_modules"),
        progress=progress,
    )
    return score_with_probe(components, *activations, seed=seed)


def score_with_probe(
    components: LostComponents,
    pruned_prompt: torch.Tensor,
    dense_correct: torch.Tensor,
    dense_wrong: torch.Tensor,
    seed: int = 0,
) -> LostComponents:
    """Probe scores from activations already captured (pruned heads' rows, dense rows already mapped)."""
    if pruned_prompt.shape[1] != components.num_heads:
        raise ValueError(
            f"The probe activations cover {pruned_prompt.shape[1]} heads, the components {components.num_heads}."
        )
    accuracy, valid_loss = probe_scores(
        pruned_prompt, components.main_components(MAIN_COMPONENTS_K), dense_correct, dense_wrong, seed=seed
    )
    scored = components.with_scores(accuracy, "probe", tie_break=valid_loss)
    scored.metadata["num_pairs"] = int(pruned_prompt.shape[0])
    return scored
