"""The language-model head only where a loss or a score reads it.

A causal LM's forward computes ``batch x sequence x vocabulary`` logits; with vocabularies of 128k-262k that tensor
(fp32, plus its log-softmax and, in training, its gradient) is most of the memory of a step. Recovery training reads
the logits at the labelled positions only (the response, not the prompt), and calibration reads none.

``lm_head_at`` narrows the head's input with a forward pre-hook on the model's output embeddings, so the model's own
forward still runs whatever it applies after the head (Gemma's final logit soft-capping, Cohere's logit scale,
Granite's scaling): the rows that come out are exactly the full forward's rows at those positions.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100


def output_head(model: nn.Module) -> nn.Module:
    """The module that maps hidden states to logits (``lm_head``), through PEFT, DDP and FSDP wrappers."""
    inner = getattr(model, "module", model)  # DDP / accelerate wrappers keep the model under .module
    getter = getattr(inner, "get_output_embeddings", None)
    head = getter() if getter is not None else None
    if head is None:
        raise ValueError(
            f"{type(inner).__name__} has no output embeddings (get_output_embeddings() is None): the logits cannot be "
            "limited to the labelled positions. Use a causal LM with a language-model head."
        )
    return head


@contextmanager
def lm_head_at(model: nn.Module, positions: torch.Tensor | None) -> Iterator[None]:
    """Inside, ``model(...).logits`` has shape ``(1, N, vocab)``: the rows of the ``N`` True entries of the boolean
    ``positions`` (batch x sequence, row-major order), or ``(batch, 0, vocab)`` when ``positions`` is None (no logits).

    ``positions`` may be shorter than the model's sequence (prompt-learning methods prepend virtual tokens): it is
    aligned with the last ``positions.shape[1]`` positions.
    """

    def keep(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        hidden = args[0]
        if positions is None:
            selected = hidden[:, :0]
        else:
            selected = hidden[:, hidden.shape[1] - positions.shape[1] :][positions.to(hidden.device)].unsqueeze(0)
        return (selected, *args[1:]), kwargs

    handle = output_head(model).register_forward_pre_hook(keep, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def next_token_targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(positions, targets)``: the (batch x sequence) positions that predict a labelled next token, and those tokens.

    Position ``t`` predicts token ``t + 1``; the last position predicts nothing.
    """
    predicts = labels[:, 1:] != IGNORE_INDEX
    positions = torch.cat([predicts, predicts.new_zeros(predicts.shape[0], 1)], dim=1)
    return positions, labels[:, 1:][predicts]


def cross_entropy_sum(rows: torch.Tensor, targets: torch.Tensor, chunk_rows: int = 1024) -> torch.Tensor:
    """Sum of the next-token cross entropy of ``rows`` (N x vocab logits) in fp32, ``chunk_rows`` rows at a time.

    Without gradients (perplexity, scoring) the fp32 copy and log-softmax of ``rows`` then never exist for all N at
    once; with gradients autograd keeps each chunk's log-softmax for the backward pass either way.
    """
    total = rows.new_zeros((), dtype=torch.float32)
    for start in range(0, rows.shape[0], chunk_rows):
        chunk = rows[start : start + chunk_rows].float()
        total = total + F.cross_entropy(chunk, targets[start : start + chunk_rows], reduction="sum")
    return total


# Bytes per logit element held at once while a batch is scored, for fp32 logits: the logits and lm-eval's
# log-softmax of them (8 bytes measured for Llama and for Gemma 3, whose soft-capping temporaries are freed before the
# log-softmax), and half as much again for lm-eval's per-request slices and the allocator's slack.
SCORING_BYTES_PER_LOGIT = 12
# The logits of a batch may take half the memory of the model's own weights (at least LOGITS_BUDGET_FLOOR), and never
# more than MEMORY_SHARE of the free memory: the peak stays a small multiple of the model's size (the main job holds
# the dense and the pruned model while it scores), whatever the vocabulary; a large vocabulary costs batch size.
MODEL_SHARE = 0.5
MEMORY_SHARE = 0.4
LOGITS_BUDGET_FLOOR = 2**30
MAX_AUTO_BATCH = 64


def free_memory_bytes(device: torch.device | str) -> int:
    """Memory the process can still take on ``device``: free GPU memory, or the host's available memory."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    import psutil  # a dependency of accelerate

    return int(psutil.virtual_memory().available)


def parameter_bytes(model: nn.Module) -> int:
    return sum(parameter.numel() * parameter.element_size() for parameter in model.parameters())


def rows_within_budget(
    tokens_per_row: int,
    vocab_size: int,
    device: torch.device | str,
    bytes_per_logit: int = SCORING_BYTES_PER_LOGIT,
    model_bytes: int = 0,
    free_bytes: int | None = None,
) -> int:
    """How many rows of ``tokens_per_row`` tokens to score at once: the batch whose logits (and the copies made from
    them) take at most ``max(MODEL_SHARE * model_bytes, LOGITS_BUDGET_FLOOR)`` and ``MEMORY_SHARE`` of the free
    memory, between 1 and ``MAX_AUTO_BATCH``."""
    free = free_memory_bytes(device) if free_bytes is None else free_bytes
    budget = min(MEMORY_SHARE * free, max(MODEL_SHARE * model_bytes, LOGITS_BUDGET_FLOOR))
    per_row = max(tokens_per_row, 1) * vocab_size * bytes_per_logit
    return int(min(max(int(budget) // per_row, 1), MAX_AUTO_BATCH))


def parse_batch_size(text: str | int, flag: str) -> int | str:
    """A scoring batch size from the command line: ``auto`` (from the free memory) or a positive integer."""
    if text == "auto":
        return "auto"
    try:
        value = int(text)
    except (TypeError, ValueError):
        value = 0
    if value < 1:
        raise ValueError(f"{flag} must be 'auto' or a positive integer, got {text!r}.")
    return value
