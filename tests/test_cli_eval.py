"""``restorelcc eval`` end to end: a tiny model saved to disk, the real lm-eval harness, the bundled data."""

from __future__ import annotations

import json

import pytest
from peft import LoraConfig, get_peft_model
from test_evaluation import make_eval_model, make_tiny_tokenizer

from peft_restorelcc import cli


@pytest.fixture(autouse=True)
def only_the_eval_command(monkeypatch):
    """Run the real dispatcher with just this subcommand registered, independent of the other commands' modules."""
    monkeypatch.setattr(cli, "COMMAND_MODULES", ("eval",))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_model")
    make_eval_model().save_pretrained(path)
    make_tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("lora")
    # Random (not zero) LoRA weights, so the adapter visibly changes the model.
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    get_peft_model(make_eval_model(), config).save_pretrained(path)
    return path


def _eval(*args: str) -> int:
    return cli.main(["eval", *map(str, args)])


def test_writes_documented_json_and_prints_table(model_dir, tmp_path, capsys) -> None:
    output = tmp_path / "out" / "results.json"
    code = _eval(
        "--model", model_dir, "--tasks", "arc_easy,rte", "--limit", 5, "--batch-size", 4,
        "--perplexity-limit", 10, "--output", output,
    )  # fmt: skip
    assert code == 0
    results = json.loads(output.read_text())
    assert set(results) == {
        "model", "adapter", "tasks", "average", "limit", "num_items", "batch_size", "perplexity", "perplexity_passages",
    }  # fmt: skip
    assert results["model"] == str(model_dir) and results["adapter"] is None
    assert list(results["tasks"]) == ["arc_easy", "rte"]
    assert set(results["tasks"]["rte"]) == {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"}
    assert results["num_items"] == {"arc_easy": 5, "rte": 5}
    assert results["limit"] == 5 and results["batch_size"] == 4
    assert set(results["average"]) == {"acc", "acc_norm"}
    assert results["perplexity"] > 1.0 and results["perplexity_passages"] == 10
    printed = capsys.readouterr().out
    assert "| arc_easy |" in printed and "| rte |" in printed and "perplexity" in printed


def test_same_command_twice_gives_identical_results(model_dir, tmp_path) -> None:
    outputs = [tmp_path / "first.json", tmp_path / "second.json"]
    for output in outputs:
        args = ("--model", model_dir, "--tasks", "winogrande", "--limit", 8, "--no-perplexity", "--output", output)
        assert _eval(*args) == 0
    first, second = (json.loads(output.read_text()) for output in outputs)
    assert first == second
    assert first["perplexity"] is None


def test_unknown_task_exits_2_with_the_known_tasks(model_dir, capsys) -> None:
    assert _eval("--model", model_dir, "--tasks", "boolq,piqa2") == 2
    error = capsys.readouterr().err
    assert "piqa2" in error and "known tasks: boolq, rte, hellaswag, winogrande, arc_easy" in error
    assert "lm-eval ls tasks" in error and len(error.strip().splitlines()) == 1


def test_lora_adapter_directory_is_loaded(model_dir, lora_dir, tmp_path) -> None:
    common = ("--model", model_dir, "--tasks", "openbookqa", "--limit", 5, "--perplexity-limit", 10)
    assert _eval(*common, "--output", tmp_path / "base.json") == 0
    assert _eval(*common, "--adapter", lora_dir, "--output", tmp_path / "lora.json") == 0
    base = json.loads((tmp_path / "base.json").read_text())
    lora = json.loads((tmp_path / "lora.json").read_text())
    assert lora["adapter"] == str(lora_dir)
    assert lora["num_items"] == {"openbookqa": 5}
    assert lora["perplexity"] != pytest.approx(base["perplexity"], rel=1e-4)


def test_missing_adapter_directory_exits_2(model_dir, tmp_path, capsys) -> None:
    assert _eval("--model", model_dir, "--adapter", tmp_path / "nowhere", "--tasks", "rte") == 2
    assert "adapter directory" in capsys.readouterr().err
