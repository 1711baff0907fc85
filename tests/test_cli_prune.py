"""``restorelcc prune`` on a tiny model saved to a temporary directory (a local path, as a user would pass)."""

from __future__ import annotations

import json
import string
from pathlib import Path

import pytest
import torch
from tiny_models import make_tiny_model
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from peft_restorelcc.cli import main
from peft_restorelcc.pruning import REPORT_FILE, calibration_windows, check_nm_pattern, load_report, measure_sparsity


def make_char_tokenizer() -> PreTrainedTokenizerFast:
    """A real (fast) character-level tokenizer whose ids fit the tiny models' vocabulary of 97."""
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for char in " " + string.ascii_letters + string.digits + ".,;:!?'\"-()":
        vocab[char] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny") / "llama"
    make_tiny_model("llama").save_pretrained(path)
    make_char_tokenizer().save_pretrained(path)
    return path


def run_cli(argv: list[str]) -> int:
    """``restorelcc`` as installed: the real dispatcher (ValueError -> one line on stderr, exit 2)."""
    return main(argv)


def test_magnitude_writes_model_tokenizer_and_report(model_dir: Path, tmp_path: Path, capsys) -> None:
    output = tmp_path / "out"
    code = run_cli(["prune", "--model", str(model_dir), "--method", "magnitude", "--sparsity", "0.5",
                    "--output", str(output)])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "achieved sparsity" in printed and "0.5000" in printed and str(output) in printed
    assert {"config.json", "model.safetensors", "tokenizer.json", REPORT_FILE} <= {p.name for p in output.iterdir()}
    report = json.loads((output / REPORT_FILE).read_text())
    assert report["method"] == "magnitude" and report["overall_sparsity"] == 0.5
    assert report["source_model"] == str(model_dir) and report["calibration"] is None
    reloaded = AutoModelForCausalLM.from_pretrained(output)
    assert measure_sparsity(reloaded)["overall_sparsity"] == 0.5
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging directory left behind


def test_wanda_nm_with_calibration_text(model_dir: Path, tmp_path: Path) -> None:
    output = tmp_path / "wanda"
    code = run_cli(["prune", "--model", str(model_dir), "--method", "wanda", "--pattern", "2:4",
                    "--calibration-samples", "4", "--seq-len", "16", "--output", str(output)])  # fmt: skip
    assert code == 0
    report = load_report(output)
    assert report["pattern"] == "2:4" and report["sparsity_target"] == 0.5
    assert report["calibration"] == {"source": "lambada train passages", "samples": 4, "seq_len": 16}
    reloaded = AutoModelForCausalLM.from_pretrained(output)
    for name, module in reloaded.named_modules():
        if name.startswith("model.layers.") and isinstance(module, torch.nn.Linear):
            assert check_nm_pattern(module.weight, 2, 4), name


def test_structured_then_sparse(model_dir: Path, tmp_path: Path, capsys) -> None:
    output = tmp_path / "small"
    code = run_cli(["prune", "--model", str(model_dir), "--structured-heads", "0.5", "--structured-ffn", "0.25",
                    "--method", "magnitude", "--sparsity", "0.5", "--calibration-samples", "4", "--seq-len", "16",
                    "--output", str(output)])  # fmt: skip
    assert code == 0
    assert "attention heads / layer  4 -> 2" in capsys.readouterr().out
    report = load_report(output)
    assert report["method"] == "structured+magnitude"
    assert report["structured"]["importance"] == "activation"
    assert sorted(report["structured"]["kept_heads"]) == [0, 1]
    reloaded = AutoModelForCausalLM.from_pretrained(output)
    assert (reloaded.config.num_attention_heads, reloaded.config.intermediate_size) == (2, 48)
    assert measure_sparsity(reloaded)["overall_sparsity"] == 0.5


def test_refuses_a_non_empty_output_dir(model_dir: Path, tmp_path: Path, capsys) -> None:
    output = tmp_path / "taken"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    code = run_cli(["prune", "--model", str(model_dir), "--method", "magnitude", "--sparsity", "0.5",
                    "--output", str(output)])  # fmt: skip
    assert code == 2
    assert "is not an empty directory" in capsys.readouterr().err
    assert [p.name for p in output.iterdir()] == ["keep.txt"]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--method", "magnitude", "--sparsity", "1.5"], r"outside [0, 1)"),
        (["--method", "magnitude", "--pattern", "4:2"], "0 < N < M"),
        (["--method", "magnitude", "--pattern", "two:four"], "Malformed N:M pattern"),
        (["--method", "wanda", "--pattern", "2:4", "--sparsity", "0.3"], "disagrees with pattern 2:4"),
        (["--method", "magnitude"], "sparsity is required"),
        (["--sparsity", "0.5"], "need --method"),
        ([], "nothing to do"),
        (["--structured-heads", "1.0"], "--structured-heads 1.0 is outside"),
        (["--method", "wanda", "--sparsity", "0.5", "--seq-len", "100"], "exceeds the model's 64 positions"),
        (["--method", "wanda", "--sparsity", "0.5", "--calibration-samples", "0"], "must be positive"),
    ],
)
def test_bad_flags_exit_2_with_a_clear_message(
    model_dir: Path, tmp_path: Path, capsys, flags: list[str], message: str
) -> None:
    output = tmp_path / "never"
    code = run_cli(["prune", "--model", str(model_dir), *flags, "--output", str(output)])
    assert code == 2
    err = capsys.readouterr().err
    last_line = err.strip().splitlines()[-1]  # checks that need the model come after the loading progress bar
    assert last_line.startswith("restorelcc prune: error: ") and message in last_line and "Traceback" not in err
    assert not output.exists()


def test_unknown_model_and_method(tmp_path: Path, capsys) -> None:
    code = run_cli(["prune", "--model", str(tmp_path / "missing"), "--method", "magnitude", "--sparsity", "0.5",
                    "--output", str(tmp_path / "out")])  # fmt: skip
    assert code == 2 and "restorelcc prune: error:" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # argparse rejects a method outside the choices
        run_cli(["prune", "--model", "x", "--method", "obs", "--sparsity", "0.5", "--output", str(tmp_path / "o")])
    assert exit_info.value.code == 2


def test_calibration_windows_are_deterministic_and_spread() -> None:
    tokenizer = make_char_tokenizer()
    texts = [f"passage {i:03d} " * 3 for i in range(50)]
    windows = calibration_windows(tokenizer, texts, samples=4, seq_len=10)
    assert windows.shape == (4, 10) and windows.dtype == torch.long
    assert torch.equal(windows, calibration_windows(tokenizer, texts, samples=4, seq_len=10))
    stream = [i for text in texts for i in [*tokenizer(text, add_special_tokens=False)["input_ids"], 2]]
    assert windows[0].tolist() == stream[:10]
    last = (len(stream) // 10 - 1) * 10
    assert windows[-1].tolist() == stream[last : last + 10]
    with pytest.raises(ValueError, match="lower --calibration-samples or --seq-len"):
        calibration_windows(tokenizer, texts, samples=1000, seq_len=10)
