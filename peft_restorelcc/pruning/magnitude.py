"""Magnitude pruning: the smallest |w| of every row (or of every group of M for N:M)."""

from __future__ import annotations

import torch

from .common import _row_mask


@torch.no_grad()
def magnitude_prune_weight(weight: torch.Tensor, sparsity: float, nm: tuple[int, int] | None = None) -> torch.Tensor:
    """Zero the smallest-|w| weights of every row (out x in) in place; returns the prune mask."""
    mask = _row_mask(weight.detach().abs().float(), sparsity, nm)
    weight[mask] = 0
    return mask
