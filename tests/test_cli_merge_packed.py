"""``restorelcc train`` / ``restorelcc merge`` on a compressed-tensors (llm-compressor) W4A16 checkpoint: trained on
its dequantized weights, merged beside its packed weights, which stay bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

ct = pytest.importorskip("compressed_tensors")

from compressed_tensors_models import save_w4a16  # noqa: E402
from peft import PeftModel, get_peft_model  # noqa: E402
from test_cli_train import run_cli, write_jsonl  # noqa: E402
from test_training import char_tokenizer  # noqa: E402
from tiny_models import random_input_ids  # noqa: E402
from transformers import AutoModelForCausalLM, CompressedTensorsConfig  # noqa: E402

import peft_restorelcc  # noqa: E402
from peft_restorelcc.io.export import changed_checkpoint_tensors  # noqa: E402

HEADS = {0: [1, 2], 1: [0, 3]}
TOLERANCE = 1e-5  # as tests/test_export_packed.py: measured 0 in float32


def dequantized(directory: Path):
    quantization = CompressedTensorsConfig(dequantize=True)
    return AutoModelForCausalLM.from_pretrained(directory, device_map="cpu", quantization_config=quantization)


def save_adapter(path: Path, model_dir: Path) -> Path:
    torch.manual_seed(1)
    config = peft_restorelcc.RestoreLCCConfig(heads=HEADS, init_weights="gaussian", init_std=0.5, task_type="CAUSAL_LM")
    get_peft_model(dequantized(model_dir), config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def w4a16(tmp_path_factory) -> Path:
    directory = save_w4a16(tmp_path_factory.mktemp("cli_w4a16") / "w4a16")
    char_tokenizer().save_pretrained(directory)
    return directory


def test_merge_writes_the_packed_checkpoint_with_the_biases(w4a16: Path, tmp_path: Path, capsys) -> None:
    adapter, output = save_adapter(tmp_path / "adapter", w4a16), tmp_path / "merged"
    assert run_cli(["merge", "--model", str(w4a16), "--adapter", str(adapter), "--output", str(output)]) == 0
    printed = capsys.readouterr().out
    assert "bit-identical" in printed and "compressed-tensors (pack-quantized)" in printed
    report = json.loads((output / "merge_report.json").read_text())
    assert report["quantized_weights_unchanged"] and report["checkpoint_tensors_changed"] == []
    assert len(report["biases_written"]) == 8
    assert changed_checkpoint_tensors(w4a16, output) == []
    ids = random_input_ids(2, 12)
    with torch.no_grad():
        expected = PeftModel.from_pretrained(dequantized(w4a16), adapter).eval()(ids).logits
        logits = AutoModelForCausalLM.from_pretrained(output, device_map="cpu")(ids).logits  # stock: packed W4A16
    torch.testing.assert_close(logits, expected, rtol=0, atol=TOLERANCE)
    assert (output / "tokenizer.json").is_file() or (output / "tokenizer_config.json").is_file()


def test_merge_refuses_a_packed_architecture_without_a_bias_switch(tmp_path: Path, capsys) -> None:
    mistral = save_w4a16(tmp_path / "mistral", model_type="mistral")
    adapter, output = save_adapter(tmp_path / "adapter", mistral), tmp_path / "merged"
    capsys.readouterr()  # the checkpoint builder's progress bars
    assert run_cli(["merge", "--model", str(mistral), "--adapter", str(adapter), "--output", str(output)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("restorelcc merge: error: Cannot merge RestoreLCC into the packed")
    assert "mistral" in err[0] and "attention_bias" in err[0]
    assert not output.exists()


def test_train_loads_the_w4a16_checkpoint_dequantized(w4a16: Path, tmp_path: Path, capsys) -> None:
    adapter, output = save_adapter(tmp_path / "adapter", w4a16), tmp_path / "trained"
    argv = ["train", "--model", str(w4a16), "--adapter", str(adapter), "--output", str(output),
            "--data", str(write_jsonl(tmp_path / "data.jsonl")), "--seq-len", "32", "--batch-size", "4",
            "--max-steps", "2", "--threads", "1"]  # fmt: skip
    capsys.readouterr()
    assert run_cli(argv) == 0
    assert "loading it dequantized" in capsys.readouterr().err
    assert (output / "adapter_config.json").is_file()
