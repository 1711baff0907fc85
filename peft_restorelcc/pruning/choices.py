"""What a user can ask the pruners for: the methods, the sparsity and the N:M pattern, checked without torch.

The command line builds its parsers and checks its flags from here before any model (or torch) is loaded.
"""

from __future__ import annotations

METHODS = ("magnitude", "wanda", "sparsegpt")


def parse_pattern(pattern: str | tuple[int, int] | list[int] | None) -> tuple[int, int] | None:
    """``"2:4"`` or ``(2, 4)`` -> ``(2, 4)``; ``None``/``"unstructured"`` -> ``None``. ValueError when malformed."""
    if pattern is None:
        return None
    if isinstance(pattern, str):
        text = pattern.strip().lower()
        if text in ("", "none", "unstructured"):
            return None
        parts = text.split(":")
        if len(parts) != 2 or not all(part.strip().isdigit() for part in parts):
            raise ValueError(
                f"Malformed N:M pattern {pattern!r}: write it as two integers 'N:M' with 0 < N < M, e.g. '2:4' "
                "(at most 2 non-zeros in every 4 consecutive weights) or '4:8'."
            )
        n, m = int(parts[0]), int(parts[1])
    elif isinstance(pattern, (tuple, list)) and len(pattern) == 2 and all(isinstance(v, int) for v in pattern):
        n, m = int(pattern[0]), int(pattern[1])
    else:
        raise ValueError(f"Malformed N:M pattern {pattern!r}: pass a string such as '2:4' or a tuple (2, 4).")
    if not 0 < n < m:
        raise ValueError(
            f"Invalid N:M pattern {n}:{m}: N is the number of non-zeros kept in every M consecutive weights, so it "
            "needs 0 < N < M (e.g. '2:4' for 50%, '4:8' for 50%, '1:4' for 75%)."
        )
    return n, m


def resolve_sparsity(
    sparsity: float | None, pattern: str | tuple[int, int] | None = None
) -> tuple[float, tuple[int, int] | None]:
    """Validate a sparsity/pattern pair: ``(sparsity, (N, M) or None)``; an N:M pattern implies ``1 - N/M``."""
    nm = parse_pattern(pattern)
    return _resolve_sparsity(sparsity, nm), nm


def _resolve_sparsity(sparsity: float | None, nm: tuple[int, int] | None) -> float:
    if nm is not None:
        implied = 1.0 - nm[0] / nm[1]
        if sparsity is None:
            return implied
        if not isinstance(sparsity, (int, float)) or abs(float(sparsity) - implied) > 1e-6:
            raise ValueError(
                f"sparsity={sparsity!r} disagrees with pattern {nm[0]}:{nm[1]}, which keeps {nm[0]} of every {nm[1]} "
                f"weights and so implies sparsity={implied:g}. Pass sparsity={implied:g} or omit it (None)."
            )
        return implied
    if sparsity is None:
        raise ValueError("sparsity is required for unstructured pruning: pass a fraction in [0, 1), e.g. 0.5.")
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= float(sparsity) < 1.0:
        raise ValueError(f"sparsity={sparsity!r} is outside [0, 1): pass the fraction of weights to zero, e.g. 0.5.")
    return float(sparsity)
