"""``--data org/name[:split]``: training data from a Hub dataset, with the row schemas of local files.

The Hub-layout cache built here is what ``huggingface_hub`` writes for a dataset repository
(``datasets--org--name/snapshots/<sha>/...`` and ``refs/main``). ``datasets.load_dataset("org/name")`` does not read
that layout when offline (it raises ConnectionError: it looks only in its own prepared cache); the loader then takes
the snapshot from the Hub cache, as tested here for real in a subprocess whose environment alone sets
``HF_HUB_OFFLINE=1`` and points ``HF_HUB_CACHE`` / ``HF_DATASETS_CACHE`` into the test's folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest

from peft_restorelcc.data.user import hub_dataset, read_training_file
from peft_restorelcc.training.trainer import check_data_choice

REPO = Path(__file__).resolve().parents[1]
SHA = "89abcdef0123456789abcdef0123456789abcdef"
DATASET_ID = "data-org/tiny-sft"

TRAIN_ROWS = [
    {"prompt": "Name a colour.", "response": "Red."},
    {"instruction": "Add two and two.", "input": "", "output": "Four."},
    {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]},
    {"text": "A plain passage of text to train on."},
]
TEST_ROWS = [{"prompt": "Is ice cold?", "response": "Yes."}]


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory) -> Path:
    """An HF_HOME whose hub cache holds DATASET_ID at commit SHA (train and test splits), refs/main on it."""
    home = tmp_path_factory.mktemp("hf-home")
    entry = home / "hub" / ("datasets--" + DATASET_ID.replace("/", "--"))
    data = entry / "snapshots" / SHA / "data"
    data.mkdir(parents=True)
    # Parquet, as the Hub converts datasets to (every split of a repository must be in the same format).
    # Every row with every column (None where it has none), as a table holds mixed rows (from_list keeps the first
    # row's columns only).
    columns = list(dict.fromkeys(key for row in TRAIN_ROWS for key in row))
    datasets.Dataset.from_list([{key: row.get(key) for key in columns} for row in TRAIN_ROWS]).to_parquet(
        str(data / "train.parquet")
    )
    datasets.Dataset.from_list(TEST_ROWS).to_parquet(str(data / "test.parquet"))
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text(SHA)
    return home


def _python(home: Path, code: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if not key.startswith("HF_")}
    env.update(
        HF_HOME=str(home), HF_HUB_CACHE=str(home / "hub"), HF_DATASETS_CACHE=str(home / "datasets"),
        HF_HUB_OFFLINE="1", PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'tests'}", OMP_NUM_THREADS="1",
    )  # fmt: skip
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=cwd, timeout=600)


_READ = """
import json
from peft_restorelcc.data.user import read_training_file
from peft_restorelcc.training import build_train_dataset
from test_training import char_tokenizer
train, test = read_training_file("{id}"), read_training_file("{id}:test")
built = build_train_dataset("{id}:test", char_tokenizer(), samples=None, seq_len=64)
print(json.dumps({{"train": vars(train), "test": vars(test), "built": len(built)}}))
"""


def test_hub_dataset_loads_offline_from_the_hub_cache_with_every_row_schema(hf_home):
    done = _python(hf_home, _READ.format(id=DATASET_ID))
    assert done.returncode == 0, done.stderr[-3000:]
    read = json.loads(done.stdout.strip().splitlines()[-1])
    train = read["train"]
    assert [example["response"] for example in train["examples"]] == ["Red.", "Four."]
    assert "### Instruction:\nAdd two and two." in train["examples"][1]["prompt"]  # the Alpaca row
    assert train["chats"] == [TRAIN_ROWS[2]["messages"]] and train["texts"] == [TRAIN_ROWS[3]["text"]]
    assert read["test"]["examples"] == TEST_ROWS  # another split, from parquet
    assert read["built"] == 1  # tokenized for training (the chat row needs a chat template: not this tokenizer)


def test_missing_hub_dataset_is_one_line_exit_2_before_any_model_loads(hf_home, tmp_path):
    code = (
        "import sys\nfrom peft_restorelcc.cli import main\n"
        f"sys.exit(main(['compare', '--model', {str(tmp_path / 'absent')!r}, '--output', {str(tmp_path / 'out')!r},"
        " '--data', 'data-org/no-such-set']))"
    )
    _one_error_line(_python(hf_home, code), "data-org/no-such-set", "cannot load this Hub dataset")
    assert not (tmp_path / "out").exists()
    # A split the dataset does not have: one line too.
    _one_error_line(_python(hf_home, code.replace("data-org/no-such-set", f"{DATASET_ID}:validation")), "validation")


def _one_error_line(done: subprocess.CompletedProcess, *expected: str) -> None:
    # Other libraries may print notes when offline (a kernels package's "Skipping publisher trust check"): the
    # command's own error is the one line with "error:".
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1 and lines[0].startswith("restorelcc compare: error:"), done.stderr
    assert all(text in lines[0] for text in expected), lines[0]


def test_a_local_path_wins_over_a_hub_id(hf_home, tmp_path):
    local = tmp_path / DATASET_ID
    datasets.Dataset.from_list([{"prompt": "Local?", "response": "Yes."}]).save_to_disk(str(local))
    done = _python(hf_home, _READ.split("train, test")[0] + f'print(json.dumps(vars(read_training_file("{DATASET_ID}"))))',
                   cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["examples"] == [{"prompt": "Local?", "response": "Yes."}]


def test_hub_ids_are_recognised_without_asking_the_hub(tmp_path, monkeypatch):
    assert hub_dataset("org/name") == ("org/name", "train")
    assert hub_dataset("org/name:validation") == ("org/name", "validation")
    assert hub_dataset("org/name:train[:100]") == ("org/name", "train[:100]")
    assert hub_dataset("name") is None and hub_dataset("a/b/c") is None and hub_dataset("org/name:bad split") is None
    assert hub_dataset("data/train.jsonl") is None  # a mistyped file: "no such file", not a Hub look-up
    check_data_choice("org/name:train")  # accepted as it is: reading happens later (check_data_source)
    with pytest.raises(ValueError, match="nor a Hub dataset id"):
        check_data_choice("not-a-thing")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "name").write_text("")
    assert hub_dataset("org/name") is None  # the existing local path is taken instead


def test_online_path_calls_load_dataset_with_the_id_and_split(monkeypatch):
    """The network boundary mocked: what ``datasets.load_dataset`` is asked for and how its rows are read."""
    calls = []

    def load_dataset(path, split=None, **kwargs):
        calls.append((path, split, kwargs))
        return datasets.Dataset.from_list([TRAIN_ROWS[0], *TEST_ROWS])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    read = read_training_file("some-org/sft-set:train[:2]")
    assert calls == [("some-org/sft-set", "train[:2]", {})]
    assert [example["response"] for example in read.examples] == ["Red.", "Yes."]
