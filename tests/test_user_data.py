"""The user's own data files (peft_restorelcc.data.user): every format, every schema, every bad input."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest

from peft_restorelcc.data.user import (
    ALPACA_PROMPT_NO_INPUT,
    read_pairs,
    read_pairs_and_count_options,
    read_prompts,
    read_records,
    read_training_file,
)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_every_format_reads_the_same_rows(tmp_path: Path) -> None:
    rows = [{"text": "first prompt"}, {"text": "second prompt"}]
    jsonl = write_jsonl(tmp_path / "p.jsonl", rows)
    (tmp_path / "p.json").write_text(json.dumps(rows))
    (tmp_path / "p.csv").write_text("text\nfirst prompt\nsecond prompt\n")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "dict"))
    for path in (jsonl, tmp_path / "p.json", tmp_path / "p.csv", tmp_path / "saved", tmp_path / "dict"):
        assert read_prompts(path) == ["first prompt", "second prompt"], path
    before = sorted(p.name for p in tmp_path.iterdir())
    read_records(jsonl)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # datasets' cache is not left beside the data


def test_prompts_take_text_or_prompt(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", [{"text": "a"}, {"prompt": "b", "other": 1}])
    assert read_prompts(path) == ["a", "b"]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.jsonl", "\n\n", "is empty"),
        ("broken.jsonl", '{"text": "a"}\n{"text": \n', "cannot be read as JSON"),
        ("rows.txt", "a\nb\n", "unknown format .txt"),
        ("fields.jsonl", '{"question": "a"}\n', "row 1 has the fields ['question']; --prompts needs one of the fields"),
        ("blank.jsonl", '{"text": "a"}\n{"text": "  "}\n', "row 2 has the fields ['text']"),
    ],
)
def test_bad_prompt_files_say_what_is_wrong(tmp_path: Path, name: str, content: str, message: str) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        read_prompts(path)


def test_missing_file_and_unusable_directories(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no such file or directory"):
        read_prompts(tmp_path / "nowhere.jsonl")
    (tmp_path / "plain").mkdir()
    with pytest.raises(ValueError, match="not one datasets.save_to_disk wrote"):
        read_prompts(tmp_path / "plain")
    split = datasets.Dataset.from_list([{"text": "a"}])
    datasets.DatasetDict({"a": split, "b": split}).save_to_disk(str(tmp_path / "two"))
    with pytest.raises(ValueError, match=r"holds the splits \['a', 'b'\]"):
        read_prompts(tmp_path / "two")
    datasets.Dataset.from_list([{"text": "a"}]).select([]).save_to_disk(str(tmp_path / "none"))
    with pytest.raises(ValueError, match="holds no rows"):
        read_prompts(tmp_path / "none")


def test_pairs_with_a_wrong_answer_or_with_options(tmp_path: Path) -> None:
    rows = [
        {"prompt": "Q1", "correct": "yes", "wrong": "no"},
        {"question": "Q2", "options": ["a red apple", "quantum fields", "a red apples tree"], "answer": 0},
        {"prompt": "Q3", "choices": ["up", "down"], "label": "down"},
        {"prompt": "Q4", "answer": "left", "incorrect": "right"},
    ]
    pairs, from_options = read_pairs_and_count_options(write_jsonl(tmp_path / "pairs.jsonl", rows))
    assert from_options == 2
    assert pairs == [
        {"prompt": "Q1", "correct": "yes", "wrong": "no"},
        {"prompt": "Q2", "correct": "a red apple", "wrong": "a red apples tree"},  # the most similar option
        {"prompt": "Q3", "correct": "down", "wrong": "up"},
        {"prompt": "Q4", "correct": "left", "wrong": "right"},
    ]
    (tmp_path / "pairs.csv").write_text("prompt,correct,wrong\nQ1,yes,no\nQ5,hot,cold\n")
    assert read_pairs(tmp_path / "pairs.csv")[1] == {"prompt": "Q5", "correct": "hot", "wrong": "cold"}


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": "Q", "correct": "yes"}, "either a correct answer"),
        ({"correct": "yes", "wrong": "no"}, "row 1 has the fields ['correct', 'wrong']"),
        ({"prompt": "Q", "correct": "yes", "wrong": "no", "options": ["yes", "no"]}, "not both"),
        ({"prompt": "Q", "options": ["a", "b"], "answer": 5}, "0-based index or its text"),
        ({"prompt": "Q", "options": ["a", "b"], "answer": "c"}, "0-based index or its text"),
        ({"prompt": "Q", "options": ["a"], "answer": 0}, "at least 2 string options"),
        ({"prompt": "Q", "correct": "", "wrong": "no"}, "non-empty strings"),
    ],
)
def test_bad_pair_rows_name_the_row_and_the_schemas(tmp_path: Path, row: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        read_pairs(write_jsonl(tmp_path / "pairs.jsonl", [row]))


def test_training_file_schemas(tmp_path: Path) -> None:
    chat = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]
    rows = [
        {"prompt": "Q?", "response": " a"},
        {"instruction": "Add 2 and 2.", "input": "", "output": "4"},
        {"instruction": "Translate.", "input": "chat", "output": "cat"},
        {"messages": chat},
        {"text": "plain words"},
    ]
    read = read_training_file(write_jsonl(tmp_path / "train.jsonl", rows))
    assert read.examples[0] == {"prompt": "Q?", "response": " a"}
    assert read.examples[1] == {"prompt": ALPACA_PROMPT_NO_INPUT.format(instruction="Add 2 and 2."), "response": "4"}
    assert read.examples[2]["prompt"].endswith("### Instruction:\nTranslate.\n\n### Input:\nchat\n\n### Response:\n")
    assert read.chats == [chat] and read.texts == ["plain words"]


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"question": "Q?", "answer": "a"}, "row 1 has the fields ['answer', 'question']; --data needs per row"),
        ({"messages": [{"role": "user", "content": "Hi?"}]}, "ending with the assistant's reply"),
        ({"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}, "list of {role, content}"),
        ({"instruction": "Do.", "input": 3, "output": "ok"}, "'input' as a string"),
    ],
)
def test_bad_training_rows(tmp_path: Path, row: dict, message: str) -> None:
    pattern = message.replace("[", r"\[").replace("]", r"\]").replace("{", r"\{").replace("}", r"\}")
    with pytest.raises(ValueError, match=pattern):
        read_training_file(write_jsonl(tmp_path / "train.jsonl", [row]))
