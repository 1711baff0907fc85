"""compressed-tensors sparse checkpoints (sparse-bitmask, sparse-24-bitmask): read exactly, written back exactly.

The fixtures in tests/data/compressed_tensors were written by compressed-tensors 0.14.0.1's own compressors
(make_fixtures.py there says how); ``plain``/``plain24`` hold the same pruned bf16 models stored dense.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import compressed_writer
import pytest
import torch
from compressed_tensors.config import SparsityCompressionConfig
from safetensors.torch import load_file, save_file
from tiny_models import make_tiny_model, random_input_ids
from transformers import AutoModelForCausalLM

from peft_restorelcc.io import compressed, load_model
from peft_restorelcc.pruning import measure_sparsity, prune_model

FIXTURES = Path(__file__).parent / "data" / "compressed_tensors"
PAIRS = [("bitmask", "plain", compressed.BITMASK), ("sparse24", "plain24", compressed.SPARSE24)]


def assert_identical(model, reference) -> None:
    """Every tensor bit for bit, dtype included (so every zero is still a zero and no value was rounded)."""
    state, expected = model.state_dict(), reference.state_dict()
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        assert state[key].dtype == value.dtype, key
        assert torch.equal(state[key], value), key


@pytest.mark.parametrize(("name", "reference", "fmt"), PAIRS)
def test_llm_compressor_checkpoints_are_read_exactly(name, reference, fmt):
    assert compressed.sparse_format(FIXTURES / name) == fmt
    assert compressed.sparse_format(FIXTURES / reference) is None
    model = load_model(FIXTURES / name)
    plain = load_model(FIXTURES / reference)
    assert model.dtype == torch.bfloat16
    assert_identical(model, plain)
    assert measure_sparsity(model) == measure_sparsity(plain)
    assert getattr(model.config, "quantization_config", None) is None
    with torch.no_grad():
        assert torch.equal(model(random_input_ids()).logits, plain(random_input_ids()).logits)


def test_stock_transformers_drops_the_sparse_weights_which_is_why_we_decompress():
    """transformers 5 + compressed-tensors >= 0.15 no longer know the sparse formats: the weights come back MISSING."""
    stock = AutoModelForCausalLM.from_pretrained(FIXTURES / "bitmask")
    plain = load_model(FIXTURES / "plain")
    weight = "model.layers.0.self_attn.o_proj.weight"
    assert not torch.equal(stock.state_dict()[weight], plain.state_dict()[weight])


@pytest.mark.parametrize(("name", "reference", "fmt"), PAIRS)
def test_the_fixture_writer_matches_the_compressed_tensors_files(name, reference, fmt, tmp_path):
    plain = load_model(FIXTURES / reference)
    assert compressed_writer.choose_format(plain) == fmt
    output = compressed_writer.save_sparse(plain, tmp_path / "out")
    ours = load_file(output / "model.safetensors")
    theirs = load_file(FIXTURES / name / "model.safetensors")
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        assert torch.equal(ours[key].reshape(value.shape), value), key
    config = json.loads((output / "config.json").read_text())["quantization_config"]
    parsed = SparsityCompressionConfig.load_from_registry(
        config["sparsity_config"]["format"], **config["sparsity_config"]
    )
    assert parsed.format == fmt and parsed.global_sparsity == pytest.approx(0.5, abs=0.01)
    assert_identical(load_model(output), plain)


def test_an_unstructured_model_is_written_as_bitmask_and_round_trips(tmp_path):
    model = make_tiny_model("llama")
    prune_model(model, "magnitude", 0.6, progress=False)
    output = compressed_writer.save_sparse(model, tmp_path / "out")
    assert compressed.sparse_format(output) == compressed.BITMASK
    assert_identical(load_model(output), model)
    with pytest.raises(ValueError, match="2:4"):
        compressed_writer.save_sparse(model, tmp_path / "forced", fmt=compressed.SPARSE24)
    assert not (tmp_path / "forced").exists()


def test_2_4_groups_with_extra_zeros_round_trip():
    weight = torch.tensor([[0.0, 0.0, 0.0, 1.5, 2.0, 0.0, -1.0, 0.0]])
    parts = compressed_writer.compress_weight(compressed.SPARSE24, weight)
    assert parts["compressed"].shape == (1, 4)
    assert torch.equal(compressed.decompress_weight(compressed.SPARSE24, parts), weight)


def test_corrupt_and_unsupported_checkpoints_are_refused(tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(FIXTURES / "bitmask", broken)
    state = load_file(broken / "model.safetensors")
    key = "model.layers.0.self_attn.o_proj.compressed"
    state[key] = state[key][:-1]
    save_file(state, broken / "model.safetensors")
    with pytest.raises(ValueError, match="corrupt"):
        load_model(broken)

    for fmt, message in (("marlin-24", "not supported"),):
        other = tmp_path / fmt
        shutil.copytree(FIXTURES / "bitmask", other)
        config = json.loads((other / "config.json").read_text())
        config["quantization_config"]["sparsity_config"]["format"] = fmt
        (other / "config.json").write_text(json.dumps(config))
        with pytest.raises(ValueError, match=message):
            load_model(other)
    quantized = tmp_path / "quantized"
    shutil.copytree(FIXTURES / "bitmask", quantized)
    config = json.loads((quantized / "config.json").read_text())
    config["quantization_config"]["config_groups"] = {"group_0": {"targets": ["Linear"]}}
    (quantized / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="quantized"):
        load_model(quantized)
