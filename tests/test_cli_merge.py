"""``restorelcc merge``: RestoreLCC keeps every zero of the pruned model; LoRA fills them, and the CLI says so."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from test_cli_train import run_cli, save_adapter, save_model, write_jsonl
from test_model import prune_half
from tiny_models import make_tiny_model, random_input_ids
from transformers import AutoModelForCausalLM

from peft_restorelcc.pruning import measure_sparsity


@pytest.fixture(scope="module")
def pruned(tmp_path_factory) -> Path:
    return save_model(tmp_path_factory.mktemp("merge") / "pruned", prune_half(make_tiny_model("llama")))


@torch.no_grad()
def adapted_logits(model_dir: Path, adapter: Path) -> torch.Tensor:
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter).eval()
    return model(random_input_ids()).logits


@torch.no_grad()
def stock_logits(model_dir: Path) -> torch.Tensor:
    return AutoModelForCausalLM.from_pretrained(model_dir).eval()(random_input_ids()).logits


def test_train_then_merge_keeps_the_sparsity_exactly(pruned: Path, tmp_path: Path, capsys) -> None:
    adapter = save_adapter(tmp_path / "adapter", pruned, init_std=0.1)
    trained, merged = tmp_path / "trained", tmp_path / "merged"
    argv = ["train", "--model", str(pruned), "--adapter", str(adapter), "--output", str(trained), "--data",
            str(write_jsonl(tmp_path / "data.jsonl")), "--seq-len", "32", "--batch-size", "4", "--max-steps", "2"]  # fmt: skip
    assert run_cli(argv) == 0
    capsys.readouterr()
    assert run_cli(["merge", "--model", str(pruned), "--adapter", str(trained), "--output", str(merged)]) == 0
    printed = capsys.readouterr().out
    assert "RESTORELCC" in printed and "unchanged" in printed
    report = json.loads((merged / "merge_report.json").read_text())
    assert report["sparsity_unchanged"] and report["zeros_before"] == report["zeros_after"] > 0
    # Stock transformers reloads the merged model, compensation included, and every pruned weight is still zero.
    torch.testing.assert_close(stock_logits(merged), adapted_logits(pruned, trained), rtol=1e-5, atol=1e-5)
    reloaded = AutoModelForCausalLM.from_pretrained(merged)
    original = AutoModelForCausalLM.from_pretrained(pruned)
    assert measure_sparsity(reloaded) == measure_sparsity(original)
    assert (merged / "tokenizer.json").is_file()


def test_lora_merge_reports_the_lost_sparsity(pruned: Path, tmp_path: Path, capsys) -> None:
    adapter, merged = tmp_path / "lora", tmp_path / "merged"
    base = AutoModelForCausalLM.from_pretrained(pruned)
    config = LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM")
    get_peft_model(base, config).save_pretrained(adapter)
    assert run_cli(["merge", "--model", str(pruned), "--adapter", str(adapter), "--output", str(merged)]) == 0
    printed = capsys.readouterr().out
    assert "LORA" in printed and "CHANGED" in printed
    report = json.loads((merged / "merge_report.json").read_text())
    assert report["sparsity_after"] < report["sparsity_before"] and not report["sparsity_unchanged"]
    torch.testing.assert_close(stock_logits(merged), adapted_logits(pruned, adapter), rtol=1e-5, atol=1e-5)


def test_refusals_exit_2_and_leave_nothing(pruned: Path, tmp_path: Path, capsys) -> None:
    adapter = save_adapter(tmp_path / "adapter", pruned)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    assert run_cli(["merge", "--model", str(pruned), "--adapter", str(adapter), "--output", str(taken)]) == 2
    assert "is not an empty directory" in capsys.readouterr().err
    assert run_cli(["merge", "--model", str(pruned), "--adapter", str(tmp_path), "--output", str(tmp_path / "x")]) == 2
    assert "is not an adapter directory" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_an_architecture_that_cannot_carry_the_bias_is_refused(tmp_path: Path, capsys) -> None:
    # Issue 36: a plain qwen2 now converts to Llama; one with a sliding window has no exact equivalent.
    qwen2 = save_model(tmp_path / "qwen2", prune_half(make_tiny_model("qwen2", use_sliding_window=True)))
    adapter = save_adapter(tmp_path / "adapter", qwen2)
    output = tmp_path / "merged"
    assert run_cli(["merge", "--model", str(qwen2), "--adapter", str(adapter), "--output", str(output)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("restorelcc merge: error: Cannot export a merged RestoreLCC model") and "qwen2" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "qwen2"]  # no output, no staging directory
