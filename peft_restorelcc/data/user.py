"""The user's own data files: calibration prompts, probe pairs and training examples.

A file is a JSON Lines (``.jsonl``), JSON (``.json``) or CSV (``.csv``) file, or a directory written by
``datasets.Dataset.save_to_disk``; all are read with the ``datasets`` library (its cache goes to a temporary
directory that is removed, so nothing is written next to the data). Where no such path exists, ``org/name`` (or
``org/name:split``, default split ``train``) is a dataset on the Hugging Face Hub, loaded with
``datasets.load_dataset`` under the user's own cache, token and offline settings. Each row must follow one of the
schemas below; the first row that does not is reported with its number, the fields it has and the fields it needs.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets

from ..io.hub import is_hub_id
from .choices import (
    CORRECT_FIELDS,
    FILE_SUFFIXES,
    OPTIONS_FIELDS,
    PAIR_PROMPT_FIELDS,
    PAIRS_HELP,
    PROMPT_FIELDS,
    PROMPTS_HELP,
    TRAINING_HELP,
    WRONG_FIELDS,
)
from .pairs import pairs_from_choices


def _describe(path: Path) -> str:
    return f"{path} (a .jsonl, .json or .csv file, or a datasets.save_to_disk directory)"


def hub_dataset(text: str | os.PathLike) -> tuple[str, str] | None:
    """``(repo_id, split)`` when ``text`` names a Hub dataset (``org/name`` or ``org/name:split``, split ``train``
    by default; a slice as ``datasets`` takes it, ``train[:1000]``, too) and no local path of that name exists (a
    local path always wins), else None. Reads nothing."""
    text = str(text)
    if Path(text).expanduser().exists():
        return None
    repo, _, split = text.partition(":")
    if Path(repo).suffix.lower() in FILE_SUFFIXES:
        return None  # data/train.jsonl is a mistyped file, not a Hub dataset
    # A split name, optionally sliced as datasets allows (train[:1000], train[10%:]).
    if not is_hub_id(repo) or (split and not re.fullmatch(r"[\w.-]+(\[[\w:%-]*\])?", split)):
        return None
    return repo, split or "train"


def _load_hub(repo: str, split: str, flag: str) -> datasets.Dataset:
    """One split of a Hub dataset. ``datasets.load_dataset`` first (downloads when online, its own cache when
    offline); where that fails, the dataset's snapshot in the Hugging Face Hub cache (``hf download --repo-type
    dataset``), which ``datasets`` does not read by itself when offline. ValueError with one line."""
    try:
        return datasets.load_dataset(repo, split=split)
    except Exception as error:  # noqa: BLE001 - datasets raises many types; the snapshot may still serve
        first = error
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(repo, repo_type="dataset", local_files_only=True)
    except Exception:  # noqa: BLE001 - not in the Hub cache either: report the load's own failure
        reason = " ".join(str(first).split())[:300]
        raise ValueError(
            f"{flag} {repo}:{split}: no local path of that name, and cannot load this Hub dataset "
            f"({type(first).__name__}: {reason}); check the id, the split, your network or HF_HUB_OFFLINE, and your "
            "token (hf auth login) for a private one."
        ) from first
    try:
        return datasets.load_dataset(folder, split=split)
    except Exception as error:  # noqa: BLE001
        reason = " ".join(str(error).split())[:300]
        raise ValueError(
            f"{flag} {repo}:{split}: the cached Hub dataset cannot be read ({type(error).__name__}: {reason})."
        ) from error


def read_records(path: str | os.PathLike, flag: str = "the file") -> list[dict[str, Any]]:
    """The rows of a data file (or Hub dataset, ``hub_dataset``) as dicts (see the module docstring for the
    formats); ValueError for a missing, unreadable or empty file."""
    hub = hub_dataset(path)
    if hub is not None:
        table = _load_hub(*hub, flag)
        if len(table) == 0:
            raise ValueError(f"{flag} {path}: the Hub dataset's split {hub[1]!r} holds no rows.")
        return table.to_list()
    path = Path(path).expanduser()
    if not path.exists():
        raise ValueError(f"{flag} {path}: no such file or directory; pass {_describe(path)}.")
    if path.is_dir():
        table = _load_from_disk(path, flag)
    else:
        builder = FILE_SUFFIXES.get(path.suffix.lower())
        if builder is None:
            raise ValueError(f"{flag} {path}: unknown format {path.suffix or '(no suffix)'}; pass {_describe(path)}.")
        raw = path.read_bytes()
        if not raw.strip():
            raise ValueError(f"{flag} {path} is empty: write one row per example.")
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as error:
            line = raw[: error.start].count(b"\n") + 1
            raise ValueError(
                f"{flag} {path} is not UTF-8 text (byte 0x{raw[error.start]:02x} at line {line}): save it as UTF-8 "
                "(e.g. iconv -f latin1 -t utf-8)."
            ) from None
        table = _load_file(path, builder, flag)
    if len(table) == 0:
        raise ValueError(f"{flag} {path} holds no rows: write one row per example.")
    return table.to_list()


def _load_from_disk(path: Path, flag: str) -> datasets.Dataset:
    try:
        loaded = datasets.load_from_disk(str(path))
    except IndexError as error:  # datasets fails so on a saved dataset of no rows (no table to concatenate)
        raise ValueError(f"{flag} {path} holds no rows: write one row per example.") from error
    except (FileNotFoundError, ValueError) as error:
        raise ValueError(f"{flag} {path} is a directory but not one datasets.save_to_disk wrote ({error}).") from error
    if isinstance(loaded, datasets.DatasetDict):
        if len(loaded) == 1:
            return next(iter(loaded.values()))
        if "train" in loaded:
            return loaded["train"]
        raise ValueError(
            f"{flag} {path} holds the splits {sorted(loaded)}: save the one to use alone, or name it 'train'."
        )
    return loaded


def _load_file(path: Path, builder: str, flag: str) -> datasets.Dataset:
    cache = tempfile.mkdtemp(prefix="restorelcc-data-")
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=cache, keep_in_memory=True)
    except Exception as error:  # datasets wraps parse errors in its own types; name the file and the cause
        cause = error.__cause__ or error
        raise ValueError(
            f"{flag} {path} cannot be read as {builder.upper()}: {type(cause).__name__}: {cause}"
        ) from error
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def _first(row: dict[str, Any], names: Sequence[str]) -> tuple[str | None, Any]:
    for name in names:
        if row.get(name) is not None:
            return name, row[name]
    return None, None


def _bad_row(flag: str, path: Path, number: int, row: dict[str, Any], needs: str) -> ValueError:
    present = sorted(name for name, value in row.items() if value is not None)
    return ValueError(f"{flag} {path}: row {number} has the fields {present}; {flag} needs {needs}.")


def read_prompts(path: str | os.PathLike, flag: str = "--prompts") -> list[str]:
    """Calibration prompts: the ``text`` (or ``prompt``) field of every row, in file order."""
    path = Path(path).expanduser()
    prompts = []
    for number, row in enumerate(read_records(path, flag), start=1):
        _, text = _first(row, PROMPT_FIELDS)
        if not isinstance(text, str) or not text.strip():
            raise _bad_row(flag, path, number, row, PROMPTS_HELP + ", not empty")
        prompts.append(text)
    return prompts


def read_pairs(path: str | os.PathLike, similarity: str = "jaccard", flag: str = "--pairs") -> list[dict[str, str]]:
    """Probe pairs ``{"prompt", "correct", "wrong"}`` from the rows of a file (schemas: ``PAIRS_HELP``), in file
    order. Rows with options get as wrong answer the option most similar to the correct one by ``similarity``."""
    return read_pairs_and_count_options(path, similarity, flag)[0]


def read_pairs_and_count_options(
    path: str | os.PathLike, similarity: str = "jaccard", flag: str = "--pairs"
) -> tuple[list[dict[str, str]], int]:
    """``read_pairs`` and how many of its rows listed options (whose wrong answer ``similarity`` chose)."""
    path = Path(path).expanduser()
    pairs: list[dict[str, str] | None] = []
    option_items: list[dict[str, Any]] = []
    option_slots: list[int] = []
    for number, row in enumerate(read_records(path, flag), start=1):
        _, prompt = _first(row, PAIR_PROMPT_FIELDS)
        _, correct = _first(row, CORRECT_FIELDS)
        _, wrong = _first(row, WRONG_FIELDS)
        _, options = _first(row, OPTIONS_FIELDS)
        if not isinstance(prompt, str) or not prompt.strip() or correct is None or (wrong is None) == (options is None):
            raise _bad_row(flag, path, number, row, PAIRS_HELP + " (a wrong answer or options, not both)")
        if wrong is not None:
            if not isinstance(correct, str) or not isinstance(wrong, str) or not correct.strip() or not wrong.strip():
                raise _bad_row(flag, path, number, row, "the correct and the wrong answer as non-empty strings")
            pairs.append({"prompt": prompt, "correct": correct, "wrong": wrong})
            continue
        option_slots.append(len(pairs))
        option_items.append({"prompt": prompt, "choices": _options(options), "answer": _answer_index(correct, options)})
        if option_items[-1]["answer"] is None or len(option_items[-1]["choices"]) < 2:
            raise _bad_row(
                flag, path, number, row, "at least 2 string options and the correct one's 0-based index or its text"
            )
        pairs.append(None)
    for slot, pair in zip(option_slots, pairs_from_choices(option_items, similarity)):
        pairs[slot] = pair
    return [pair for pair in pairs if pair is not None], len(option_items)


def _options(options: Any) -> list[str]:
    if not isinstance(options, (list, tuple)) or not all(isinstance(option, str) for option in options):
        return []
    return list(options)


def _answer_index(correct: Any, options: Any) -> int | None:
    choices = _options(options)
    if isinstance(correct, bool):
        return None
    if isinstance(correct, int):
        return correct if 0 <= correct < len(choices) else None
    if isinstance(correct, str):
        if correct in choices:
            return choices.index(correct)
        if correct.strip().isdigit() and int(correct) < len(choices):
            return int(correct)
    return None


@dataclass
class TrainingFile:
    """A training file's rows by kind: ``{"prompt", "response"}`` (Alpaca rows already written as such), chats
    (lists of ``{"role", "content"}``), and plain texts."""

    examples: list[dict[str, str]] = field(default_factory=list)
    chats: list[list[dict[str, str]]] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)


# The Alpaca prompt (tatsu-lab/stanford_alpaca), with and without an input.
ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. Write a "
    "response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n"
    "### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def alpaca_example(instruction: str, output: str, input: str | None = None) -> dict[str, str]:
    """An Alpaca row as ``{"prompt", "response"}``: the Alpaca prompt, then the output."""
    if input and input.strip():
        return {"prompt": ALPACA_PROMPT.format(instruction=instruction, input=input), "response": output}
    return {"prompt": ALPACA_PROMPT_NO_INPUT.format(instruction=instruction), "response": output}


def _chat(messages: Any) -> list[dict[str, str]] | None:
    if not isinstance(messages, list) or not messages:
        return None
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            return None
        if not isinstance(message.get("content"), str):
            return None
    if messages[-1]["role"] != "assistant" or len(messages) < 2:
        return None
    return [{"role": message["role"], "content": message["content"]} for message in messages]


def read_training_file(path: str | os.PathLike, flag: str = "--data") -> TrainingFile:
    """A training file's rows, each in one of the schemas of ``TRAINING_HELP``."""
    path = Path(path).expanduser()
    read = TrainingFile()
    for number, row in enumerate(read_records(path, flag), start=1):
        if isinstance(row.get("prompt"), str) and isinstance(row.get("response"), str):
            read.examples.append({"prompt": row["prompt"], "response": row["response"]})
        elif isinstance(row.get("instruction"), str) and isinstance(row.get("output"), str):
            if row.get("input") is not None and not isinstance(row["input"], str):
                raise _bad_row(flag, path, number, row, "'input' as a string (or absent) in an Alpaca row")
            read.examples.append(alpaca_example(row["instruction"], row["output"], row.get("input")))
        elif row.get("messages") is not None:
            chat = _chat(row["messages"])
            if chat is None:
                raise _bad_row(
                    flag, path, number, row, "'messages' as a list of {role, content} strings ending with the "
                    "assistant's reply after at least one other turn"
                )  # fmt: skip
            read.chats.append(chat)
        elif isinstance(row.get("text"), str):
            read.texts.append(row["text"])
        else:
            raise _bad_row(flag, path, number, row, TRAINING_HELP)
    return read
