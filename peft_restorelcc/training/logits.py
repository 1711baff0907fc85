"""The language-model head only where a loss or a score reads it.

A causal LM's forward computes ``batch x sequence x vocabulary`` logits; with vocabularies of 128k-262k that tensor
(fp32, plus its log-softmax and, in training, its gradient) is most of the memory of a step. Recovery training reads
the logits at the labelled positions only (the response, not the prompt), and calibration reads none.

``lm_head_at`` narrows the head's input with a forward pre-hook on the model's output embeddings, so the model's own
forward still runs whatever it applies after the head (Gemma's final logit soft-capping, Cohere's logit scale,
Granite's scaling): the rows that come out are exactly the full forward's rows at those positions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

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


@dataclass
class HeadInputs:
    """What ``head_inputs_at`` captured of one forward: the hidden states at the selected positions (N x hidden,
    still in the autograd graph), and the model's own logits of the first ``check_rows`` of them."""

    hidden: torch.Tensor | None = None
    check_rows: int = 0


@contextmanager
def head_inputs_at(model: nn.Module, positions: torch.Tensor, check_rows: int = 2) -> Iterator[HeadInputs]:
    """Inside, a forward captures the head's input at the True entries of ``positions`` (as ``lm_head_at`` selects
    them) and lets only the first ``check_rows`` of them through the head: ``model(...).logits`` is then
    ``(1, check_rows, vocab)``, the model's own rows, to check ``head_logits`` against (``head_logits_match``)."""
    captured = HeadInputs()

    def keep(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        hidden = args[0]
        selected = hidden[:, hidden.shape[1] - positions.shape[1] :][positions.to(hidden.device)]
        captured.hidden = selected
        captured.check_rows = min(check_rows, selected.shape[0])
        return (selected[: captured.check_rows].unsqueeze(0), *args[1:]), kwargs

    handle = output_head(model).register_forward_pre_hook(keep, with_kwargs=True)
    try:
        yield captured
    finally:
        handle.remove()


def _text_config(model: nn.Module) -> object:
    config = getattr(getattr(model, "module", model), "config", None)
    getter = getattr(config, "get_text_config", None)
    return getter() if getter is not None else config


def head_logits(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """hidden rows -> logits rows, as the model's forward computes them after its last norm: the output embeddings,
    then what transformers applies after them (Gemma 2/3's final soft-capping, Cohere's logit scale, Granite's
    logits scaling). ``head_logits_match`` checks the result against the model's own rows at every use."""
    head = output_head(model)
    config = _text_config(model)
    cap = getattr(config, "final_logit_softcapping", None)
    scale = getattr(config, "logit_scale", None)
    divisor = getattr(config, "logits_scaling", None)

    def logits(hidden: torch.Tensor) -> torch.Tensor:
        rows = head(hidden)
        if scale is not None:
            rows = rows * scale
        if divisor is not None:
            rows = rows / divisor
        if cap is not None:
            rows = torch.tanh(rows / cap) * cap
        return rows

    return logits


def head_logits_match(model_rows: torch.Tensor, computed_rows: torch.Tensor) -> bool:
    """Whether ``head_logits`` reproduced the model's own rows (to float rounding): False for a model that applies
    something else after its head, whose loss must then be computed from its own logits."""
    if model_rows.shape != computed_rows.shape:
        return False
    return torch.allclose(computed_rows.float(), model_rows.float(), rtol=1e-4, atol=1e-5)


def token_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Per-row ``T^2 * KL(softmax(teacher / T) || softmax(student / T))`` (rows x vocab -> rows), in fp32."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"Student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ: "
            "distillation needs models with the same vocabulary."
        )
    student_log_probs = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = F.kl_div(student_log_probs, teacher_log_probs, log_target=True, reduction="none").sum(dim=-1)
    return kl * temperature**2


# Logit bytes (fp32) of one training chunk: the head runs this many rows at a time and keeps none for the backward
# pass (each chunk is recomputed there), so a step holds one chunk's logits, its log-softmax and their gradient.
TRAINING_CHUNK_BYTES = 64 * 2**20
# Below this many fp32 logit bytes in a step the head runs in one call, as the model's own loss does.
TRAINING_CHUNK_THRESHOLD = 256 * 2**20


def chunked_head_loss(
    logits_of: Callable[[torch.Tensor], torch.Tensor],
    hidden: torch.Tensor,
    targets: torch.Tensor,
    *,
    teacher_logits_of: Callable[[torch.Tensor], torch.Tensor] | None = None,
    teacher_hidden: torch.Tensor | None = None,
    alpha: float = 0.0,
    temperature: float = 1.0,
    chunk_rows: int = 64,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(loss sum, LM sum, KL sum)`` over the rows of ``hidden`` (N x hidden), ``chunk_rows`` rows at a time: the
    sum of ``alpha * KL(teacher || student) + (1 - alpha) * cross entropy``, with each chunk's logits recomputed in
    the backward pass instead of kept, so no N x vocabulary tensor exists. The LM and KL sums come back detached
    (for the logs); KL is None without a teacher."""
    def chunk_loss(student: torch.Tensor, teacher: torch.Tensor | None, chunk_targets: torch.Tensor) -> tuple:
        rows = logits_of(student)
        lm = F.cross_entropy(rows.float(), chunk_targets, reduction="sum")
        if teacher is None:
            return lm, lm.detach(), lm.new_zeros(())
        with torch.no_grad():
            teacher_rows = teacher_logits_of(teacher)
        kl = token_kl(rows, teacher_rows, temperature).sum()
        return alpha * kl + (1.0 - alpha) * lm, lm.detach(), kl.detach()

    loss = hidden.new_zeros((), dtype=torch.float32)
    lm_sum = hidden.new_zeros((), dtype=torch.float32)
    kl_sum = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_rows):
        end = start + chunk_rows
        teacher = None if teacher_hidden is None else teacher_hidden[start:end]
        if torch.is_grad_enabled():
            chunk = checkpoint(chunk_loss, hidden[start:end], teacher, targets[start:end], use_reentrant=False)
        else:
            chunk = chunk_loss(hidden[start:end], teacher, targets[start:end])
        loss, lm_sum, kl_sum = loss + chunk[0], lm_sum + chunk[1], kl_sum + chunk[2]
    return loss, lm_sum, (None if teacher_hidden is None else kl_sum)


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


