"""Capture what each attention head writes into its layer's output projection.

A forward PRE-hook on every attention output projection (found by ``heads.find_head_projections``; Linear or
GPT-2 Conv1D) reads the projection's input, i.e. the concatenated heads, at the selected token positions: the
last non-padding token of each row (``position="last"``, the paper) or every non-padding token (``"all"``). No
modeling code is forked: the hooks see whatever the architecture feeds its projection.
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..io.devices import input_device
from ..tuner.heads import HeadProjection, find_head_projections, head_dim_of, text_config
from .components import normalize_kept_heads, read_projection_weight

ModelSource = nn.Module | Callable[[], nn.Module]
POSITIONS = ("last", "all")
_SVD_CHUNK = 32  # heads per batched SVD call


@dataclass(frozen=True)
class ModelStructure:
    """What must agree between a dense and a pruned model for their heads to be compared."""

    num_hidden_layers: int | None
    layer_indices: tuple[int, ...]
    heads_per_layer: tuple[int, ...]
    head_dim: int
    vocab_size: int | None
    module_names: tuple[str, ...] = ()


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model under a PeftModel (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def model_name(model_or_source: Any) -> str | None:
    name = getattr(model_or_source, "name", None)
    if isinstance(name, str):
        return name
    config = getattr(unwrap(model_or_source), "config", None) if isinstance(model_or_source, nn.Module) else None
    return getattr(config, "_name_or_path", None) or None


def structure_of(model: nn.Module, target_modules: str | list[str] | None = None) -> ModelStructure:
    model = unwrap(model)
    config = text_config(model)
    projections = find_head_projections(model, target_modules=target_modules, head_dim=head_dim_of(model))
    return ModelStructure(
        num_hidden_layers=getattr(config, "num_hidden_layers", None),
        layer_indices=tuple(p.layer_index for p in projections),
        heads_per_layer=tuple(p.num_heads for p in projections),
        head_dim=projections[0].head_dim,
        vocab_size=getattr(config, "vocab_size", None),
        module_names=tuple(p.name for p in projections),
    )


def structure_of_config(config: Any) -> ModelStructure:
    """The structure of an unpruned model from its config alone (all layers have ``num_attention_heads`` heads)."""
    config = text_config(config)
    layers = int(config.num_hidden_layers)
    return ModelStructure(
        num_hidden_layers=layers,
        layer_indices=tuple(range(layers)),
        heads_per_layer=(int(config.num_attention_heads),) * layers,
        head_dim=head_dim_of(config),
        vocab_size=getattr(config, "vocab_size", None),
    )


def check_compatible(dense: ModelStructure, pruned: ModelStructure, kept_heads: dict[int, list[int]] | None) -> None:
    """Raise a ValueError saying what differs when the pruned model's heads cannot be compared with the dense one's."""
    if dense.num_hidden_layers != pruned.num_hidden_layers or dense.layer_indices != pruned.layer_indices:
        raise ValueError(
            f"The dense and pruned models differ in their layers: dense has {dense.num_hidden_layers} layers "
            f"(attention projections in layers {list(dense.layer_indices)}), pruned has {pruned.num_hidden_layers} "
            f"(layers {list(pruned.layer_indices)}). Calibrate a pruned model against the dense model it came from."
        )
    if dense.head_dim != pruned.head_dim:
        raise ValueError(f"head_dim differs: dense {dense.head_dim}, pruned {pruned.head_dim}.")
    if dense.vocab_size is not None and pruned.vocab_size is not None and dense.vocab_size != pruned.vocab_size:
        raise ValueError(
            f"Vocabulary size differs: dense {dense.vocab_size}, pruned {pruned.vocab_size}; the two models do not "
            "share a tokenizer."
        )
    dense_index(dense, pruned, kept_heads)  # raises on bad head counts / kept_heads


def dense_index(dense: ModelStructure, pruned: ModelStructure, kept_heads: dict[int, list[int]] | None) -> torch.Tensor:
    """For every pruned head (stacked rows), the stacked row of the dense head it came from.

    Pruned head ``j`` of layer ``l`` is dense head ``kept_heads[l][j]``; without ``kept_heads`` the layers must
    have the same number of heads and head ``j`` is head ``j``.
    """
    rows: list[torch.Tensor] = []
    dense_offset = 0
    for layer, dense_heads, pruned_heads in zip(pruned.layer_indices, dense.heads_per_layer, pruned.heads_per_layer):
        kept = None if kept_heads is None else kept_heads.get(layer)
        if kept is None:
            if pruned_heads != dense_heads:
                raise ValueError(
                    f"Layer {layer} has {pruned_heads} heads in the pruned model and {dense_heads} in the dense one: "
                    "the model is structurally pruned. Pass kept_heads={layer: [dense indices of the kept heads]} "
                    "(the structured pruning report has it) so that each pruned head is compared with its dense head."
                )
            kept = list(range(dense_heads))
        if len(kept) != pruned_heads:
            raise ValueError(f"kept_heads[{layer}] lists {len(kept)} heads but the pruned layer has {pruned_heads}.")
        if len(set(kept)) != len(kept) or any(not 0 <= h < dense_heads for h in kept):
            raise ValueError(f"kept_heads[{layer}] = {kept} must be distinct dense head indices in [0, {dense_heads}).")
        rows.append(dense_offset + torch.tensor(kept, dtype=torch.long))
        dense_offset += dense_heads
    return torch.cat(rows)


def output_metric(model: nn.Module, projections: list[HeadProjection]) -> torch.Tensor | None:
    """``W_h^T W_h`` for every head's slice ``W_h`` of its output projection: ``(heads, d, d)`` fp32 on CPU.

    ``None`` when a projection is offloaded by accelerate (its weight is not materialised outside the forward).
    """
    modules = dict(unwrap(model).named_modules())
    metrics = []
    for projection in projections:
        weight = read_projection_weight(modules[projection.name])
        if weight is None:
            return None
        per_head = weight.float().reshape(projection.out_features, projection.num_heads, projection.head_dim)
        metrics.append(torch.einsum("ohd,ohe->hde", per_head, per_head).cpu())
    return torch.cat(metrics)


# ----------------------------------------------------------------------------------------------- tokenization
def tokenize(
    texts: Sequence[str] | Sequence[Sequence[int]] | torch.Tensor,
    tokenizer: Any = None,
    max_length: int | None = 512,
) -> list[list[int]]:
    """Token id lists; strings need a tokenizer. Long inputs keep their LAST ``max_length`` tokens (the position
    that is read)."""
    if isinstance(texts, torch.Tensor):
        texts = texts.tolist()
    sequences: list[list[int]] = []
    for item in texts:
        if isinstance(item, str):
            if tokenizer is None:
                raise ValueError("Text prompts need a tokenizer; pass tokenizer=... or token id lists.")
            ids = list(tokenizer(item, add_special_tokens=True)["input_ids"])
        else:
            ids = [int(t) for t in item]
        if not ids:
            raise ValueError(f"Prompt {item!r} has no tokens.")
        if max_length is not None and len(ids) > max_length:
            ids = ids[-max_length:]
        sequences.append(ids)
    if not sequences:
        raise ValueError("No prompts to calibrate on.")
    return sequences


def pad_id_of(tokenizer: Any) -> int:
    if tokenizer is not None:
        for attribute in ("pad_token_id", "eos_token_id"):
            value = getattr(tokenizer, attribute, None)
            if isinstance(value, int):
                return value
    return 0  # any id works: padded positions are masked out and never read


def check_tokens_fit(sequences: list[list[int]], vocab_size: int | None, what: str) -> None:
    if vocab_size is None:
        return
    largest = max(max(ids) for ids in sequences)
    if largest >= vocab_size or min(min(ids) for ids in sequences) < 0:
        raise ValueError(
            f"Token id {largest} does not fit the {what} model's vocabulary of {vocab_size}: the tokenizer does not "
            "belong to this model."
        )


def check_same_tokenizer(dense_tokenizer: Any, pruned_tokenizer: Any) -> None:
    if dense_tokenizer is None or pruned_tokenizer is None or dense_tokenizer is pruned_tokenizer:
        return
    if dense_tokenizer.get_vocab() != pruned_tokenizer.get_vocab():
        raise ValueError("The dense and pruned tokenizers have different vocabularies; they must be the same.")
    for attribute in ("bos_token_id", "eos_token_id"):
        if getattr(dense_tokenizer, attribute, None) != getattr(pruned_tokenizer, attribute, None):
            raise ValueError(f"The dense and pruned tokenizers differ in {attribute}.")


@dataclass(frozen=True)
class Batch:
    indices: torch.Tensor  # rows of the original sequence list, in batch order
    input_ids: torch.Tensor
    attention_mask: torch.Tensor


def make_batches(sequences: list[list[int]], batch_size: int, pad_id: int, padding_side: str = "right") -> list[Batch]:
    """Batches of similar lengths (sorted, so little padding), padded on ``padding_side``; deterministic."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}.")
    order = sorted(range(len(sequences)), key=lambda i: (-len(sequences[i]), i))
    batches = []
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = len(sequences[chunk[0]])
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, index in enumerate(chunk):
            tokens = torch.tensor(sequences[index], dtype=torch.long)
            span = slice(width - len(tokens), width) if padding_side == "left" else slice(0, len(tokens))
            ids[row, span] = tokens
            mask[row, span] = 1
        batches.append(Batch(torch.tensor(chunk, dtype=torch.long), ids, mask))
    return batches


def last_token_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last non-padding token of each row; right or left padding alike."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.bool() * (positions + 1)).argmax(dim=1)


# ----------------------------------------------------------------------------------------------- hooks
class _StopForward(Exception):
    """Raised by a hook once every hooked projection has been read: the rest of the forward is not needed."""


class HeadCapture:
    """Pre-hooks on the output projections; after a forward, ``take()`` gives ``(n, heads, d)`` activations.

    With ``stop_early`` the forward is cut short once every hooked projection has been read.
    """

    def __init__(self, model: nn.Module, projections: list[HeadProjection], stop_early: bool = False) -> None:
        self.projections = projections
        self.stop_early = stop_early
        self._selection: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self._outputs: list[torch.Tensor | None] = [None] * len(projections)
        modules = dict(unwrap(model).named_modules())
        self._handles = []
        for slot, projection in enumerate(projections):
            module = modules[projection.name]
            # Hook the projection itself, under any tuner wrapper: the raw heads, whatever wraps the module (a
            # RestoreLCC adapter adds its compensation at the output, so it is not included here).
            base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
            self._handles.append(base.register_forward_pre_hook(self._hook(slot), with_kwargs=True))

    def _hook(self, slot: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = args[0] if args else next(iter(kwargs.values()))
            rows, columns = self._selection
            if columns is None:  # boolean mask of the tokens to keep
                picked = hidden[rows.to(hidden.device)]
            else:
                picked = hidden[rows.to(hidden.device), columns.to(hidden.device)]
            self._outputs[slot] = picked.detach().to("cpu")
            if self.stop_early and all(out is not None for out in self._outputs):
                raise _StopForward

        return hook

    def select_last(self, attention_mask: torch.Tensor) -> None:
        rows = torch.arange(attention_mask.shape[0])
        self._selection = (rows, last_token_positions(attention_mask))

    def select_all(self, attention_mask: torch.Tensor) -> None:
        self._selection = (attention_mask.bool(), None)

    def take(self) -> torch.Tensor:
        """Activations of the last forward, ``(n, total heads, d)`` in the model's dtype, on CPU."""
        if any(out is None for out in self._outputs):
            missing = [p.name for p, out in zip(self.projections, self._outputs) if out is None]
            raise RuntimeError(f"The forward pass never reached {missing}.")
        stacked = torch.cat(
            [out.reshape(out.shape[0], p.num_heads, p.head_dim) for p, out in zip(self.projections, self._outputs)],
            dim=1,
        )
        self._outputs = [None] * len(self.projections)
        return stacked

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _backbone(model: nn.Module) -> nn.Module:
    """The decoder without the LM head: the logits are never needed, and the head is a large matmul."""
    model = unwrap(model)
    prefix = getattr(model, "base_model_prefix", None)
    inner = getattr(model, prefix, None) if prefix else None
    return inner if isinstance(inner, nn.Module) else model


@torch.no_grad()
def iterate_activations(
    model: nn.Module,
    projections: list[HeadProjection],
    batches: list[Batch],
    position: str,
    description: str = "capture",
    progress: bool = True,
    stop_early: bool = False,
) -> Iterator[tuple[Batch, torch.Tensor]]:
    """Yield ``(batch, activations)`` with activations ``(n, total heads, d)`` at the selected positions.

    For ``"last"`` ``n`` is the batch size (rows in batch order); for ``"all"`` it is the number of non-padding
    tokens of the batch in row-major order, identical for two models fed the same batch. ``stop_early`` skips the
    layers after the last hooked projection.
    """
    if position not in POSITIONS:
        raise ValueError(f"position must be one of {POSITIONS}, got {position!r}.")
    backbone = _backbone(model)
    accepted = inspect.signature(backbone.forward).parameters
    device = input_device(model)
    capture = HeadCapture(model, projections, stop_early=stop_early)
    was_training = model.training
    model.eval()
    try:
        for batch in tqdm(batches, desc=description, disable=not progress, leave=False):
            mask = batch.attention_mask
            (capture.select_last if position == "last" else capture.select_all)(mask)
            inputs: dict[str, Any] = {"input_ids": batch.input_ids.to(device), "attention_mask": mask.to(device)}
            if "position_ids" in accepted:
                # Left padding must not shift the positions of the real tokens.
                inputs["position_ids"] = (mask.cumsum(-1) - 1).clamp_min(0).to(device)
            if "use_cache" in accepted:
                inputs["use_cache"] = False
            try:
                backbone(**inputs)
            except _StopForward:
                pass
            yield batch, capture.take()
    finally:
        capture.remove()
        model.train(was_training)


def capture_activations(
    model: nn.Module,
    sequences: Sequence[Sequence[int]] | torch.Tensor,
    *,
    position: str = "last",
    batch_size: int = 8,
    pad_id: int = 0,
    padding_side: str = "right",
    target_modules: str | list[str] | None = None,
    description: str = "capture",
    progress: bool = True,
) -> torch.Tensor:
    """Head activations at the last token of each sequence, ``(N, total heads, d)`` fp32 CPU, in input order.

    (``position="all"`` concatenates all non-padding tokens, in batch order.)
    """
    projections = find_head_projections(unwrap(model), target_modules=target_modules, head_dim=head_dim_of(model))
    batches = make_batches(tokenize(sequences, max_length=None), batch_size, pad_id, padding_side)
    parts, order = [], []
    for batch, acts in iterate_activations(model, projections, batches, position, description, progress):
        parts.append(acts.float())
        order.append(batch.indices)
    stacked = torch.cat(parts)
    if position == "last":
        stacked = stacked[torch.argsort(torch.cat(order))]
    return stacked


# ----------------------------------------------------------------------------------------------- accumulation
@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """Run many small factorisations on one thread: LAPACK gains nothing from threads on a 64 x 64 problem, and
    on a busy machine the thread barriers of each of the hundreds of small calls cost more than the work (measured
    here: a batched SVD of 270 heads 10-30x slower on 2 contended threads than on 1)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class LostAccumulator:
    """Accumulates the lost activations ``X = a_dense[kept] - a_pruned`` per pruned head.

    ``"last"``: keeps the rows of X (N x heads x d; N is a few thousand at most) for an exact SVD, as the paper.
    ``"all"``: keeps only the Gram matrix X^T X (heads x d x d), sum(X) and the count, so its memory does not
    depend on the number of tokens. The SVD basis follows from the Gram: X = U S V^T gives X^T X = V S^2 V^T, so
    the Gram's eigenvectors are the right singular vectors of X and its eigenvalues the squared singular values.
    """

    def __init__(self, position: str, num_heads: int, head_dim: int, dense_rows: torch.Tensor | None = None) -> None:
        if position not in POSITIONS:
            raise ValueError(f"position must be one of {POSITIONS}, got {position!r}.")
        self.position = position
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.dense_rows = dense_rows
        self.count = 0
        self.rows: list[torch.Tensor] = []
        self.gram = torch.zeros(num_heads, head_dim, head_dim, dtype=torch.float64) if position == "all" else None
        self.total = torch.zeros(num_heads, head_dim, dtype=torch.float64)

    def add(self, dense: torch.Tensor, pruned: torch.Tensor) -> None:
        if self.dense_rows is not None:
            dense = dense[:, self.dense_rows]
        if dense.shape != pruned.shape:
            raise RuntimeError(
                f"Dense activations {tuple(dense.shape)} do not align with pruned {tuple(pruned.shape)}."
            )
        lost = dense.float() - pruned.float()  # (n, heads, d)
        self.count += lost.shape[0]
        self.total += lost.sum(0, dtype=torch.float64)
        if self.position == "last":
            self.rows.append(lost)
        else:
            per_head = lost.transpose(0, 1)  # (heads, n, d): one batched matmul for all heads
            self.gram += torch.bmm(per_head.transpose(1, 2), per_head).double()

    def state_nbytes(self) -> int:
        """Bytes held by the accumulator (grows with N only in "last" mode)."""
        tensors = [self.total] + ([self.gram] if self.gram is not None else []) + self.rows
        return sum(t.numel() * t.element_size() for t in tensors)

    def finish(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(basis (heads, d, d), singular values (heads, d), mean (heads, d))``, fp32.

        Basis rows are unit right singular vectors sorted by decreasing singular value, each signed to point along
        the mean lost vector (SVD signs are arbitrary; this makes the result reproducible).
        """
        if self.count == 0:
            raise ValueError("No lost activations were accumulated.")
        with single_threaded():
            return self._finish()

    def _finish(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        d = self.head_dim
        mean = self.total / self.count
        if self.position == "last":
            lost = torch.cat(self.rows)  # (N, heads, d)
            self.rows = [lost]
            singular_parts, basis_parts = [], []
            # A few heads at a time: the float64 copy and U (N x min(N, d) per head) stay small for any N.
            for start in range(0, self.num_heads, _SVD_CHUNK):
                part = lost[:, start : start + _SVD_CHUNK].transpose(0, 1).double()  # (chunk, N, d)
                # full_matrices only when N < d, so that the basis is still complete (d rows) but U stays small.
                _, singular, vh = torch.linalg.svd(part, full_matrices=part.shape[1] < d)
                singular_parts.append(torch.nn.functional.pad(singular, (0, d - singular.shape[1])))
                basis_parts.append(vh)
            singular, basis = torch.cat(singular_parts), torch.cat(basis_parts)
        else:
            eigenvalues, eigenvectors = torch.linalg.eigh(self.gram)  # ascending
            singular = eigenvalues.flip(-1).clamp_min(0).sqrt()
            basis = eigenvectors.flip(-1).transpose(1, 2)
        basis = torch.nn.functional.normalize(basis, dim=-1)
        alignment = torch.einsum("hkd,hd->hk", basis, mean)
        largest = basis.gather(-1, basis.abs().argmax(-1, keepdim=True)).squeeze(-1)
        sign = torch.where(alignment.abs() > 1e-9, alignment.sign(), largest.sign())
        sign = torch.where(sign == 0, torch.ones_like(sign), sign)
        basis = basis * sign.unsqueeze(-1)
        return basis.float(), singular.float(), mean.float()


class ActivationStore:
    """Per-batch activations of the first model, kept until the second model produces its batch.

    In memory for ``"last"`` (N rows); spooled to disk for ``"all"`` (one file per batch, model dtype), so that the
    RAM in use does not grow with the number of tokens when the two models are run one after the other.
    """

    def __init__(self, on_disk: bool, directory: str | None = None) -> None:
        self.on_disk = on_disk
        self._memory: list[torch.Tensor] = []
        self._directory = tempfile.mkdtemp(prefix="restorelcc-spool-", dir=directory) if on_disk else None
        self._count = 0

    def append(self, tensor: torch.Tensor) -> None:
        if self.on_disk:
            torch.save(tensor.contiguous(), os.path.join(self._directory, f"{self._count}.pt"))
        else:
            self._memory.append(tensor.float())
        self._count += 1

    def __getitem__(self, index: int) -> torch.Tensor:
        if self.on_disk:
            return torch.load(os.path.join(self._directory, f"{index}.pt"), weights_only=True).float()
        return self._memory[index]

    def close(self) -> None:
        self._memory = []
        if self._directory is not None:
            shutil.rmtree(self._directory, ignore_errors=True)
            self._directory = None


def obtain(source: ModelSource) -> tuple[nn.Module, bool]:
    """``(model, owned)``: a loader is called (and the model is ours to free), a module is used as is."""
    if isinstance(source, nn.Module):
        return source, False
    if callable(source):
        model = source()
        if not isinstance(model, nn.Module):
            raise ValueError(f"The model loader returned {type(model).__name__}, not a torch module.")
        return model, True
    raise ValueError(f"Expected a model or a callable that loads one, got {type(source).__name__}.")


def release(owned: bool) -> None:
    """After dropping the last reference to a model we loaded, give its memory back (callers' models stay)."""
    if not owned:
        return
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------- probe activations
def join_text(prompt: str, answer: str) -> str:
    """Prompt + answer, with a space between them unless either side already has one."""
    if prompt and answer and not prompt[-1].isspace() and not answer[0].isspace():
        return prompt + " " + answer
    return prompt + answer


@dataclass
class ProbeInputs:
    """The probe's three token lists: prompts (read in the pruned model), prompt + correct, prompt + wrong (dense)."""

    prompts: list[list[int]]
    correct: list[list[int]]
    wrong: list[list[int]]

    def all_sequences(self) -> list[list[int]]:
        return self.prompts + self.correct + self.wrong


def probe_inputs(pairs: Sequence[dict[str, str]], tokenizer: Any, max_length: int | None) -> ProbeInputs:
    """Tokenise contrastive pairs ``[{"prompt", "correct", "wrong"}]``; raises on too few or incomplete pairs."""
    if len(pairs) < 2:
        raise ValueError(f"The probe needs at least 2 contrastive pairs, got {len(pairs)}.")
    for pair in pairs:
        missing = {"prompt", "correct", "wrong"} - set(pair)
        if missing:
            raise ValueError(f"Contrastive pair {pair!r} lacks {sorted(missing)}.")
    return ProbeInputs(
        prompts=tokenize([p["prompt"] for p in pairs], tokenizer, max_length),
        correct=tokenize([join_text(p["prompt"], p["correct"]) for p in pairs], tokenizer, max_length),
        wrong=tokenize([join_text(p["prompt"], p["wrong"]) for p in pairs], tokenizer, max_length),
    )


def capture_probe_prompts(model: nn.Module, probe: ProbeInputs, **capture: Any) -> torch.Tensor:
    """The pruned model's heads at the last token of the probe prompts (the paper's probe input)."""
    return capture_activations(model, probe.prompts, position="last", description="pruned model: probe", **capture)


def capture_probe_answers(
    model: nn.Module, probe: ProbeInputs, rows: torch.Tensor | None, **capture: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """The dense model's heads at the last token of prompt + correct and prompt + wrong; ``rows`` maps them onto
    the pruned heads (``None``: the same heads)."""
    correct = capture_activations(
        model, probe.correct, position="last", description="dense model: correct answers", **capture
    )
    wrong = capture_activations(
        model, probe.wrong, position="last", description="dense model: wrong answers", **capture
    )
    if rows is not None:
        correct, wrong = correct[:, rows], wrong[:, rows]
    return correct, wrong


def dense_rows(
    model: nn.Module,
    pruned: ModelStructure,
    kept_heads: dict[int, list[int]] | None,
    sequences: list[list[int]],
    target_modules: str | list[str] | None,
) -> torch.Tensor | None:
    """Checks the dense model against the pruned one; the dense row of every pruned head, ``None`` if identity
    (then no gather, i.e. no copy of every batch's activations, is needed)."""
    structure = structure_of(model, target_modules)
    check_compatible(structure, pruned, kept_heads)
    check_tokens_fit(sequences, structure.vocab_size, "dense")
    rows = dense_index(structure, pruned, kept_heads)
    return None if torch.equal(rows, torch.arange(len(rows))) else rows


def probe_activations(
    dense: ModelSource,
    pruned: ModelSource,
    pairs: Sequence[dict[str, str]],
    tokenizer: Any = None,
    *,
    kept_heads: dict[int, list[int]] | None = None,
    batch_size: int = 8,
    max_length: int | None = 512,
    padding_side: str | None = None,
    target_modules: str | list[str] | None = None,
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(pruned at prompt, dense at prompt+correct, dense at prompt+wrong)``, each ``(pairs, pruned heads, d)``.

    The models (modules or loaders) are used one at a time: the pruned model first, then the dense one.
    """
    probe = probe_inputs(pairs, tokenizer, max_length)
    kept_heads = normalize_kept_heads(kept_heads)
    capture = {
        "batch_size": batch_size,
        "pad_id": pad_id_of(tokenizer),
        "padding_side": padding_side or getattr(tokenizer, "padding_side", None) or "right",
        "target_modules": target_modules,
        "progress": progress,
    }
    sequences = probe.all_sequences()
    pruned_model, owned = obtain(pruned)
    try:
        structure = structure_of(pruned_model, target_modules)
        check_tokens_fit(sequences, structure.vocab_size, "pruned")
        pruned_prompt = capture_probe_prompts(pruned_model, probe, **capture)
    finally:
        pruned_model = None
        release(owned)
    dense_model, owned = obtain(dense)
    try:
        rows = dense_rows(dense_model, structure, kept_heads, sequences, target_modules)
        correct, wrong = capture_probe_answers(dense_model, probe, rows, **capture)
    finally:
        dense_model = None
        release(owned)
    return pruned_prompt, correct, wrong
