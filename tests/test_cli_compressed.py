"""The CLI on pruned models saved in compressed-tensors' sparse formats (legacy input): calibrate, train, eval and merge
read them exactly; merge writes plain safetensors with the zeros stored; the retired sparse output is refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import compressed_writer
import pytest
import torch
from peft import PeftModel
from test_cli_train import run_cli, save_adapter, write_jsonl
from test_evaluation import make_eval_model, make_tiny_tokenizer
from test_training import char_tokenizer
from tiny_models import make_tiny_model, random_input_ids
from transformers import AutoModelForCausalLM

import peft_restorelcc  # noqa: F401  (registers the tuner)
from peft_restorelcc.io import compressed, load_model
from peft_restorelcc.pruning import measure_sparsity

FIXTURES = Path(__file__).parent / "data" / "compressed_tensors"


def with_tokenizer(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    char_tokenizer().save_pretrained(target)
    return target


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ct_cli")
    dense = root / "dense"
    make_tiny_model("llama").to(torch.bfloat16).save_pretrained(dense)  # what the fixtures were pruned from
    char_tokenizer().save_pretrained(dense)
    paths = {"dense": dense}
    for name in ("bitmask", "sparse24", "plain", "plain24"):
        paths[name] = with_tokenizer(FIXTURES / name, root / name)
    return paths


@pytest.mark.parametrize(("name", "reference"), [("bitmask", "plain"), ("sparse24", "plain24")])
def test_calibrate_gives_the_same_components_as_from_the_plain_model(models, name, reference, tmp_path) -> None:
    outputs = {}
    for which in (name, reference):
        outputs[which] = tmp_path / which
        argv = ["calibrate", "--dense", str(models["dense"]), "--pruned", str(models[which]), "--num-heads", "3",
                "--output", str(outputs[which]), "--strategy", "lost_norm", "--samples", "6", "--max-length", "40",
                "--batch-size", "3", "--device", "cpu"]  # fmt: skip
        assert run_cli(argv) == 0
    from safetensors.torch import load_file

    ours = load_file(outputs[name] / "lost_components" / "lost_components.safetensors")
    plain = load_file(outputs[reference] / "lost_components" / "lost_components.safetensors")
    assert ours.keys() == plain.keys()
    for key in plain:
        assert torch.equal(ours[key], plain[key]), key


@pytest.mark.parametrize("name", ["bitmask", "sparse24"])
def test_train_then_merge_a_compressed_input_gives_a_plain_servable_model(models, name, tmp_path, capsys) -> None:
    """A legacy sparse checkpoint in, plain safetensors out: every zero kept, no sparsity or quantization config
    (vLLM 0.24+ refuses a config with a sparsity_config), stock transformers reloads it."""
    model_dir = models[name]
    adapter = save_adapter(tmp_path / "adapter", models["plain"], init_std=0.1)
    trained, merged = tmp_path / "trained", tmp_path / "merged"
    argv = ["train", "--model", str(model_dir), "--adapter", str(adapter), "--output", str(trained), "--data",
            str(write_jsonl(tmp_path / "data.jsonl")), "--seq-len", "32", "--batch-size", "4", "--max-steps", "2"]  # fmt: skip
    assert run_cli(argv) == 0
    capsys.readouterr()
    assert run_cli(["merge", "--model", str(model_dir), "--adapter", str(trained), "--output", str(merged)]) == 0
    assert "unchanged" in capsys.readouterr().out
    config = json.loads((merged / "config.json").read_text())
    assert "quantization_config" not in config and "sparsity_config" not in config
    assert compressed.sparse_format(merged) is None
    stock = AutoModelForCausalLM.from_pretrained(merged)
    assert measure_sparsity(stock) == measure_sparsity(load_model(model_dir))
    with torch.no_grad():
        adapted = PeftModel.from_pretrained(load_model(model_dir), trained).eval()(random_input_ids()).logits
        logits = stock(random_input_ids()).logits
    # The unmerged adapter adds W @ shift in bf16; the merged bias rounds once: equal up to bf16 rounding.
    torch.testing.assert_close(logits.float(), adapted.float(), atol=0.05, rtol=0.02)
    assert (merged / "tokenizer.json").is_file()


def test_the_retired_compressed_tensors_output_is_refused_with_the_way_out(models, tmp_path, capsys) -> None:
    adapter = save_adapter(tmp_path / "adapter", models["plain"], init_std=0.1)
    output = tmp_path / "merged"
    capsys.readouterr()
    argv = ["merge", "--model", str(models["bitmask"]), "--adapter", str(adapter), "--output", str(output),
            "--format", "compressed-tensors"]  # fmt: skip
    assert run_cli(argv) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "retired" in error[0] and "plain safetensors" in error[0]
    assert not output.exists()


def test_eval_reads_a_compressed_model_as_its_plain_twin(tmp_path) -> None:
    from peft_restorelcc import cli
    from peft_restorelcc.pruning import prune_model

    model = make_eval_model()
    prune_model(model, "magnitude", 0.5, progress=False)
    plain, sparse = tmp_path / "plain", tmp_path / "sparse"
    model.save_pretrained(plain)
    compressed_writer.save_sparse(model, sparse)
    results = {}
    for which in (plain, sparse):
        make_tiny_tokenizer().save_pretrained(which)
        output = tmp_path / f"{which.name}.json"
        argv = ["eval", "--model", str(which), "--tasks", "arc_easy", "--limit", "5", "--batch-size", "4",
                "--perplexity-limit", "5", "--output", str(output)]  # fmt: skip
        assert cli.main(argv) == 0
        results[which.name] = json.loads(output.read_text())
    assert results["sparse"]["tasks"] == results["plain"]["tasks"]
    assert results["sparse"]["perplexity"] == results["plain"]["perplexity"]
