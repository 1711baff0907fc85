"""Wanda (Sun et al., 2023): prune the lowest |W_ij| * ||X_j||_2 of every row."""

from __future__ import annotations

import torch

from .common import _row_mask


@torch.no_grad()
def wanda_prune_weight(
    weight: torch.Tensor, input_sq_norms: torch.Tensor, sparsity: float, nm: tuple[int, int] | None = None
) -> torch.Tensor:
    """Wanda: zero the lowest ``|W_ij| * ||X_j||_2`` of every row in place; ``input_sq_norms[j] = sum_t x_tj^2``."""
    scores = weight.detach().abs().float() * input_sq_norms.float().sqrt().to(weight.device).unsqueeze(0)
    mask = _row_mask(scores, sparsity, nm)
    weight[mask] = 0
    return mask
