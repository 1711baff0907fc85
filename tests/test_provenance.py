"""An adapter names the model it was trained on as its base: ``AutoPeftModelForCausalLM`` on the adapters that
``run``, ``calibrate`` + ``train`` and ``compare`` write loads the *pruned* model (checked by its sparsity and its
logits), never the dense one it was pruned from; the pruned model's config names that one in ``pruned_from``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import AutoPeftModelForCausalLM, PeftModel
from test_cli_run import FAST as RUN_FAST
from test_compare import FAST as COMPARE_FAST
from test_training import char_tokenizer
from tiny_models import make_tiny_model, random_input_ids
from transformers import AutoModelForCausalLM

from peft_restorelcc.cli import main
from peft_restorelcc.pruning import measure_sparsity


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tiny-dense")
    make_tiny_model("llama", max_position_embeddings=512, initializer_range=0.3).save_pretrained(directory)
    char_tokenizer().save_pretrained(directory)
    return directory


def base_of(adapter: Path) -> str:
    return json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=random_input_ids(batch=2, length=10)).logits


def assert_loads_the_pruned_base(adapter: Path, pruned: Path) -> PeftModel:
    """AutoPeftModelForCausalLM on ``adapter`` loads ``pruned``: its weights bit for bit (half of them zero), and the
    logits of the pruned model under that adapter."""
    assert base_of(adapter) == str(pruned.resolve())
    auto = AutoPeftModelForCausalLM.from_pretrained(adapter).eval()
    expected_base = AutoModelForCausalLM.from_pretrained(pruned)
    assert measure_sparsity(expected_base)["overall_sparsity"] == pytest.approx(0.5, abs=0.01)
    weights = dict(expected_base.named_parameters())
    loaded = {name.replace(".base_layer", ""): parameter for name, parameter in auto.get_base_model().named_parameters()
              if not parameter.requires_grad or ".base_layer" in name}  # fmt: skip
    assert {name for name in loaded if name in weights} == set(weights)
    assert all(torch.equal(loaded[name], weights[name]) for name in weights)
    expected = PeftModel.from_pretrained(expected_base, adapter).eval()
    torch.testing.assert_close(logits(auto), logits(expected), rtol=0, atol=0)
    return auto


def test_run_names_its_pruned_model_as_the_adapters_base(dense_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative --output-dir: the adapter must still name an absolute directory
    assert main(["run", "--model", str(dense_dir), "--output-dir", "run", *RUN_FAST]) == 0
    output = tmp_path / "run"
    auto = assert_loads_the_pruned_base(output / "adapter", output / "pruned")
    # The run's restored model, as merged: the same logits (the merge folds the adapter into o_proj biases).
    merged = AutoModelForCausalLM.from_pretrained(output / "merged").eval()
    torch.testing.assert_close(logits(auto), logits(merged), rtol=0, atol=1e-5)
    pruned_config = json.loads((output / "pruned" / "config.json").read_text())
    assert pruned_config["pruned_from"] == str(dense_dir.resolve())
    # Training checkpoints (optimizer state) never sit in the adapter's folder, and are gone after the run.
    assert not list((output / "adapter").glob("checkpoint-*")) and not (output / "checkpoints").exists()


def test_calibrate_and_train_name_the_model_they_ran_on(dense_dir, tmp_path):
    pruned = tmp_path / "pruned"
    assert main(["prune", "--model", str(dense_dir), "--method", "magnitude", "--sparsity", "0.5",
                 "--output", str(pruned)]) == 0  # fmt: skip
    assert json.loads((pruned / "config.json").read_text())["pruned_from"] == str(dense_dir.resolve())
    adapter, trained = tmp_path / "adapter", tmp_path / "trained"
    assert main([
        "calibrate", "--model", str(dense_dir), "--pruned", str(pruned), "--num-heads", "2", "--output", str(adapter),
        "--samples", "4", "--num-pairs", "4", "--negatives", "jaccard", "--max-length", "40", "--batch-size", "2",
    ]) == 0  # fmt: skip
    assert_loads_the_pruned_base(adapter, pruned)
    assert main([
        "train", "--model", str(pruned), "--adapter", str(adapter), "--output", str(trained), "--samples", "4",
        "--max-steps", "1", "--batch-size", "2", "--seq-len", "32",
    ]) == 0  # fmt: skip
    assert_loads_the_pruned_base(trained, pruned)


def test_compare_saves_the_model_it_pruned_and_its_adapters_name_it(dense_dir, tmp_path):
    flags = [{"restorelcc,lora": "restorelcc,lora", "0,1": "0"}.get(flag, flag) for flag in COMPARE_FAST]
    output = tmp_path / "out"
    assert main(["compare", "--model", str(dense_dir), "--output", str(output), *flags]) == 0
    pruned = output / "pruned"
    assert json.loads((pruned / "config.json").read_text())["pruned_from"] == str(dense_dir.resolve())
    for method in ("restorelcc", "lora"):
        assert_loads_the_pruned_base(output / "work" / f"{method}-seed0", pruned)


# ------------------------------------------------------------------------------------------------ the base's weights


def test_an_adapter_refuses_another_base_of_the_same_shape_unless_forced(dense_dir, tmp_path, capsys):
    import warnings

    from peft_restorelcc.io import BASE_RECORD
    from peft_restorelcc.tuner.fingerprint import weights_fingerprint

    pruned, other, adapter = tmp_path / "pruned", tmp_path / "other", tmp_path / "adapter"
    for directory, method in ((pruned, "magnitude"), (other, "wanda")):
        assert main(["prune", "--model", str(dense_dir), "--method", method, "--sparsity", "0.5", "--output",
                     str(directory), "--samples", "4"]) == 0  # fmt: skip
    assert main([
        "calibrate", "--model", str(dense_dir), "--pruned", str(pruned), "--num-heads", "2", "--output", str(adapter),
        "--samples", "4", "--num-pairs", "4", "--negatives", "jaccard", "--max-length", "40", "--batch-size", "2",
    ]) == 0  # fmt: skip
    record = json.loads((adapter / BASE_RECORD).read_text())
    assert record["fingerprint"] == weights_fingerprint(pruned) != weights_fingerprint(other)
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_fingerprint"] == record["fingerprint"]
    capsys.readouterr()
    for base in (dense_dir, other):  # the dense model and another pruning: same shapes, other weights
        merged = tmp_path / f"merged-{base.name}"
        assert main(["merge", "--model", str(base), "--adapter", str(adapter), "--output", str(merged)]) == 2
        line = capsys.readouterr().err.strip()
        assert "has other weights" in line and str(pruned.resolve()) in line and "--force" in line and "\n" not in line
        assert not merged.exists()
        for command in (["eval", "--model", str(base), "--adapter", str(adapter), "--tasks", "boolq", "--limit", "1"],
                        ["train", "--model", str(base), "--adapter", str(adapter), "--output", str(tmp_path / "t"),
                         "--samples", "4", "--max-steps", "1"]):  # fmt: skip
            assert main(command) == 2 and "has other weights" in capsys.readouterr().err
    assert main(["merge", "--model", str(other), "--adapter", str(adapter), "--output", str(tmp_path / "m"),
                 "--force"]) == 0  # fmt: skip
    assert main(["merge", "--model", str(pruned), "--adapter", str(adapter), "--output", str(tmp_path / "ok")]) == 0
    # In Python PEFT's behaviour stays (the adapter loads) with one warning, once (the forced merge above warned
    # for the other pruning already).
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(dense_dir), adapter)
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(pruned), adapter)
    assert len([warning for warning in caught if "has other weights" in str(warning.message)]) == 1


def test_an_adapter_without_a_base_record_loads_and_merges_as_before(dense_dir, tmp_path):
    from test_cli_train import save_adapter

    adapter = save_adapter(tmp_path / "old-adapter", dense_dir)  # as written before the record existed
    assert not (adapter / "restorelcc_base.json").exists()
    assert main(["merge", "--model", str(dense_dir), "--adapter", str(adapter), "--output", str(tmp_path / "m")]) == 0


def test_the_fingerprint_reads_headers_and_samples_not_whole_tensors(dense_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from peft_restorelcc.tuner.fingerprint import weights_fingerprint

    copy = tmp_path / "copy"
    shutil.copytree(dense_dir, copy)
    assert weights_fingerprint(copy) == weights_fingerprint(dense_dir)  # a copy is the same model
    tensors = load_file(copy / "model.safetensors")
    name = next(key for key, value in tensors.items() if value.numel() > 64 * 16)
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] += 1.0  # one weight changed, inside the first sample window
    save_file(tensors, copy / "model.safetensors", metadata={"format": "pt"})
    assert weights_fingerprint(copy) != weights_fingerprint(dense_dir)
    assert weights_fingerprint(tmp_path / "nothing-here") is None
