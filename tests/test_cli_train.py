"""``restorelcc train`` on tiny models saved to temporary directories (local paths, as a user would pass them)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from test_model import prune_half
from test_training import char_tokenizer
from tiny_models import make_tiny_model

import peft_restorelcc
from peft_restorelcc import RestoreLCCConfig

HEADS = {0: [1, 2], 1: [3]}


def run_cli(argv: list[str]) -> int:
    """``restorelcc`` as installed: the real dispatcher (ValueError -> one line on stderr, exit 2)."""
    from peft_restorelcc import cli

    return cli.main(argv)


def save_model(path: Path, model) -> Path:
    model.save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path


def save_adapter(path: Path, model_dir: Path, seed: int = 0, init_std: float = 1e-3) -> Path:
    """A RestoreLCC adapter as `restorelcc calibrate` leaves it: a measured (here: random orthonormal) basis."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir)
    torch.manual_seed(seed)
    config = RestoreLCCConfig(init_weights="gaussian", heads=HEADS, init_std=init_std, task_type="CAUSAL_LM")
    model = get_peft_model(base, config)
    for layer in peft_restorelcc.restorelcc_layers(model):
        count = len(layer.head_indices["default"])
        basis = torch.linalg.qr(torch.randn(count, 8, 8)).Q
        model.base_model.set_head_state("default", layer.layer_index, basis=basis)
    model.save_pretrained(path)
    return path


def write_jsonl(path: Path, count: int = 8) -> Path:
    lines = [json.dumps({"prompt": f"Q{i}: what follows {i}?\nA:", "response": f" {i + 1}"}) for i in range(count)]
    lines.append(json.dumps({"text": "Plain words make windows of text for the language model loss."}))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("train_cli")
    pruned = save_model(root / "pruned", prune_half(make_tiny_model("llama")))
    return {
        "pruned": pruned,
        "dense": save_model(root / "dense", make_tiny_model("llama")),
        "adapter": save_adapter(root / "adapter", pruned),
        "data": write_jsonl(root / "data.jsonl"),
    }


def train_argv(assets: dict[str, Path], output: Path, *flags: str) -> list[str]:
    return ["train", "--model", str(assets["pruned"]), "--adapter", str(assets["adapter"]), "--output", str(output),
            "--data", str(assets["data"]), "--seq-len", "32", "--batch-size", "4", "--lr", "1e-2", *flags]  # fmt: skip


def test_train_writes_a_loadable_adapter_and_metrics(assets: dict[str, Path], tmp_path: Path, capsys) -> None:
    output = tmp_path / "trained"
    assert run_cli(train_argv(assets, output, "--max-steps", "3", "--logging-steps", "1", "--threads", "1")) == 0
    printed = capsys.readouterr().out
    assert "final loss" in printed and str(output) in printed
    metrics = json.loads((output / "train_metrics.json").read_text())
    assert metrics["steps"] == 3 and metrics["world_size"] == 1 and metrics["distillation"] is None
    assert metrics["data"] == str(assets["data"]) and metrics["train_sequences"] == 9

    from transformers import AutoModelForCausalLM

    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(assets["pruned"]), output)
    assert loaded.peft_config["default"].heads == HEADS
    before = load_file(str(assets["adapter"] / "adapter_model.safetensors"))
    after = load_file(str(output / "adapter_model.safetensors"))
    assert before.keys() == after.keys()
    for key in before:
        # The measured basis is kept; the magnitudes and biases are what training changes.
        assert torch.equal(before[key], after[key]) == key.endswith("restorelcc_basis"), key


def test_train_with_distillation_and_resume(assets: dict[str, Path], tmp_path: Path) -> None:
    output = tmp_path / "distilled"
    flags = ["--distill-from", str(assets["dense"]), "--distill-alpha", "0.5", "--temperature", "2",
             "--save-steps", "2", "--logging-steps", "1"]  # fmt: skip
    assert run_cli(train_argv(assets, output, "--max-steps", "2", *flags)) == 0
    metrics = json.loads((output / "train_metrics.json").read_text())
    assert metrics["distillation"]["alpha"] == 0.5 and metrics["distillation"]["temperature"] == 2.0
    assert metrics["distillation"]["distill_kl"] >= 0 and metrics["distill_from"] == str(assets["dense"])
    # --resume continues the latest checkpoint in --output (here towards a longer run).
    assert run_cli(train_argv(assets, output, "--max-steps", "4", "--resume", *flags)) == 0
    metrics = json.loads((output / "train_metrics.json").read_text())
    assert metrics["steps"] == 4 and metrics["steps_this_run"] == 2
    assert metrics["resumed_from"].endswith("checkpoint-2")
    assert (output / "checkpoint-4").is_dir() and (output / "adapter_model.safetensors").is_file()


@pytest.fixture(scope="module")
def foreign_teachers(tmp_path_factory) -> tuple[Path, Path]:
    """A model with another vocabulary size, and one of the same size whose tokenizer maps other tokens."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("foreign")
    config = LlamaConfig(vocab_size=120, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, max_position_embeddings=64)  # fmt: skip
    other_size = save_model(root / "size", LlamaForCausalLM(config))
    other_tokens = root / "tokens"
    make_tiny_model("llama").save_pretrained(other_tokens)
    char_tokenizer(reverse=True).save_pretrained(other_tokens)
    return other_size, other_tokens


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--lr", "-1"], "--lr -1.0 must be a positive number"),
        (["--max-steps", "-3"], "--max-steps -3 must be a positive number of steps"),
        (["--max-steps", "0", "--epochs", "0"], "--epochs 0.0 must be > 0"),
        (["--batch-size", "0"], "--batch-size 0 must be >= 1"),
        (["--threads", "0"], "--threads 0 must be >= 1"),
        (["--distill-alpha", "0.5"], "need --distill-from"),
        (["--data", "nowhere.jsonl"], "neither one of"),
        (["--seq-len", "100"], "exceeds the model's 64 positions"),
        (["--device", "gpu0"], "unknown device 'gpu0'"),
        (["--resume"], "holds no checkpoint"),
        (["--resume", "not-a-checkpoint"], "is not a Trainer checkpoint"),
    ],
)
def test_bad_flags_exit_2_before_any_work(assets, tmp_path: Path, capsys, flags: list[str], message: str) -> None:
    output = tmp_path / "never"
    assert run_cli(train_argv(assets, output, *flags)) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("restorelcc train: error: ") and message in last and "Traceback" not in err
    assert not output.exists()


def test_missing_adapter_and_taken_output(assets, tmp_path: Path, capsys) -> None:
    argv = train_argv(assets, tmp_path / "out")
    argv[argv.index("--adapter") + 1] = str(tmp_path / "no-adapter")
    assert run_cli(argv) == 2
    assert "is not an adapter directory" in capsys.readouterr().err

    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    assert run_cli(train_argv(assets, taken)) == 2
    assert "is not empty" in capsys.readouterr().err and [p.name for p in taken.iterdir()] == ["notes.txt"]


def test_a_teacher_with_another_vocabulary_is_refused(assets, foreign_teachers, tmp_path: Path, capsys) -> None:
    other_size, other_tokens = foreign_teachers
    assert run_cli(train_argv(assets, tmp_path / "out", "--distill-from", str(other_size))) == 2
    assert "has a vocabulary of 120 tokens but --model has 97" in capsys.readouterr().err
    assert run_cli(train_argv(assets, tmp_path / "out", "--distill-from", str(other_tokens))) == 2
    assert "same vocabulary size as --model but other tokens" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_model_without_tokenizer_is_refused_with_a_fix(assets, tmp_path: Path, capsys) -> None:
    bare = tmp_path / "bare"
    prune_half(make_tiny_model("llama")).save_pretrained(bare)
    argv = train_argv(assets, tmp_path / "out")
    argv[argv.index("--model") + 1] = str(bare)
    assert run_cli(argv) == 2
    assert "cannot load a tokenizer" in capsys.readouterr().err and not (tmp_path / "out").exists()


def _data_argv(assets: dict[str, Path], output: Path, data: Path | str) -> list[str]:
    argv = train_argv(assets, output, "--max-steps", "1", "--threads", "1")
    argv[argv.index("--data") + 1] = str(data)
    return argv


def test_train_on_alpaca_rows_and_on_a_tasks_training_side(assets, tmp_path: Path) -> None:
    alpaca = tmp_path / "alpaca.jsonl"
    rows = [{"instruction": f"Count on from {i}.", "input": "", "output": f"{i + 1}"} for i in range(6)]
    rows.append({"instruction": "Name a colour.", "input": "sky", "output": "blue"})
    alpaca.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert run_cli([*_data_argv(assets, tmp_path / "a", alpaca), "--seq-len", "64"]) == 0
    assert json.loads((tmp_path / "a" / "train_metrics.json").read_text())["train_sequences"] == 7
    assert run_cli(_data_argv(assets, tmp_path / "t", "task:openbookqa")) == 0
    assert json.loads((tmp_path / "t" / "train_metrics.json").read_text())["data"] == "task:openbookqa"


def test_train_on_chat_rows_with_the_tokenizers_template(assets, tmp_path: Path) -> None:
    from test_training import CHAT_TEMPLATE

    model_dir = tmp_path / "chat-model"
    for file in assets["pruned"].iterdir():
        (model_dir / file.name).parent.mkdir(exist_ok=True)
        (model_dir / file.name).write_bytes(file.read_bytes())
    tokenizer = char_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(model_dir)
    chats = tmp_path / "chats.jsonl"
    chat = [{"role": "user", "content": "Sky?"}, {"role": "assistant", "content": "Blue."}]
    chats.write_text("".join(json.dumps({"messages": chat}) + "\n" for _ in range(4)))
    argv = _data_argv(assets, tmp_path / "out", chats)
    argv[argv.index("--model") + 1] = str(model_dir)
    assert run_cli(argv) == 0
    assert json.loads((tmp_path / "out" / "train_metrics.json").read_text())["train_sequences"] == 4


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "is empty: write one row per example"),
        ('{"question": "Q?", "answer": "a"}\n', "row 1 has the fields ['answer', 'question']; --data needs per row"),
        ('{"instruction": "Do it."}\n', "row 1 has the fields ['instruction']"),
        (
            '{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}\n',
            "need a tokenizer with a chat template",
        ),  # fmt: skip
        ('{"prompt": "Q?", "response": " a"}\n{"prompt": \n', "cannot be read as JSON"),
    ],
)
def test_a_bad_data_file_fails_cleanly_and_writes_nothing(assets, tmp_path: Path, capsys, content, message) -> None:
    data = tmp_path / "data.jsonl"
    data.write_text(content)
    output = tmp_path / "out"
    assert run_cli(_data_argv(assets, output, data)) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and not output.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["data.jsonl"]
