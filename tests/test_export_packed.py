"""save_merged_packed: a RestoreLCC merge into a compressed-tensors (llm-compressor) W4A16 checkpoint writes every
tensor of the checkpoint bit for bit plus the merged attention biases, and stock transformers reloads it as the same
W4A16 model serving the adapter's logits."""

from __future__ import annotations

import json

import pytest
import torch

ct = pytest.importorskip("compressed_tensors")

from compressed_tensors_models import save_w4a16  # noqa: E402
from peft import get_peft_model  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from tiny_models import random_input_ids  # noqa: E402
from transformers import AutoModelForCausalLM, CompressedTensorsConfig  # noqa: E402

import peft_restorelcc  # noqa: E402
from peft_restorelcc.io.export import changed_checkpoint_tensors, save_merged_packed  # noqa: E402

HEADS = {0: [1, 2], 1: [0, 3]}
# Stock reload of the packed output (compressed-tensors decompresses the int4 weights on the first forward) against the
# unmerged adapter on the dequantized base, float32. Measured: 0 (the decompressed weights are the same floats, the
# bias is added in the same place); the tolerance allows float32 reassociation. The compensation itself moves them
# by 1.14 (checked below).
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def w4a16_dir(tmp_path_factory):
    return save_w4a16(tmp_path_factory.mktemp("w4a16"))


def dequantized(directory):
    quantization = CompressedTensorsConfig(dequantize=True)
    return AutoModelForCausalLM.from_pretrained(directory, device_map="cpu", quantization_config=quantization)


def adapted(directory):
    torch.manual_seed(1)
    config = peft_restorelcc.RestoreLCCConfig(heads=HEADS, init_weights="gaussian", init_std=0.5, task_type="CAUSAL_LM")
    return get_peft_model(dequantized(directory), config).eval()


def test_the_packed_merge_keeps_every_quantized_tensor_and_reloads_with_the_adapter(w4a16_dir, tmp_path):
    model = adapted(w4a16_dir)
    ids = random_input_ids(2, 12)
    with torch.no_grad():
        expected = model(ids).logits
        with model.disable_adapter():
            uncompensated = model(ids).logits
    source_files = {path.name: path.read_bytes() for path in w4a16_dir.iterdir() if path.is_file()}
    output = save_merged_packed(model, w4a16_dir, tmp_path / "merged")

    assert {path.name: path.read_bytes() for path in w4a16_dir.iterdir() if path.is_file()} == source_files
    source, written = load_file(w4a16_dir / "model.safetensors"), load_file(output / "model.safetensors")
    assert any(name.endswith("weight_packed") for name in source)
    assert changed_checkpoint_tensors(w4a16_dir, output) == []
    added = sorted(set(written) - set(source))
    assert added == sorted(f"model.layers.{i}.self_attn.{p}.bias" for i in range(2) for p in ("q_proj", "k_proj",
                                                                                               "v_proj", "o_proj"))  # fmt: skip
    assert all(written[name].abs().max() == 0 for name in added if not name.endswith("o_proj.bias"))
    assert all(written[name].abs().max() > 0 for name in added if name.endswith("o_proj.bias"))
    config = json.loads((output / "config.json").read_text())
    assert config["attention_bias"] is True
    assert config["quantization_config"] == json.loads((w4a16_dir / "config.json").read_text())["quantization_config"]

    reloaded = AutoModelForCausalLM.from_pretrained(output, device_map="cpu")  # stock: compressed-tensors, packed
    assert any(hasattr(module, "weight_packed") for module in reloaded.modules())
    with torch.no_grad():
        logits = reloaded(ids).logits
    difference = (logits - expected).abs().max().item()
    control = (uncompensated - expected).abs().max().item()
    assert difference <= TOLERANCE < control / 100, (difference, control)


def test_an_architecture_without_a_bias_switch_is_refused_in_one_line(tmp_path):
    source = save_w4a16(tmp_path / "mistral", model_type="mistral")
    model = adapted(source)
    with pytest.raises(ValueError) as raised:
        save_merged_packed(model, source, tmp_path / "merged")
    message = str(raised.value)
    assert "\n" not in message and "mistral" in message and "attention_bias" in message
    assert not (tmp_path / "merged").exists()
    assert any(type(module).__name__ == "RestoreLCCLinear" or "restorelcc" in type(module).__module__
               for module in model.modules())  # fmt: skip  (refused before the merge)


def test_a_checkpoint_that_is_not_compressed_tensors_quantized_is_refused(w4a16_dir, tmp_path):
    from tiny_models import make_tiny_model

    make_tiny_model("llama").save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="not a compressed-tensors quantized checkpoint"):
        save_merged_packed(adapted(w4a16_dir), tmp_path / "plain", tmp_path / "merged")


def test_a_sharded_checkpoint_keeps_its_shards_and_gets_its_biases_indexed(w4a16_dir, tmp_path):
    import shutil

    from safetensors.torch import save_file

    sharded = tmp_path / "sharded"
    shutil.copytree(w4a16_dir, sharded)
    tensors = load_file(sharded / "model.safetensors")
    (sharded / "model.safetensors").unlink()
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for shard, shard_names in halves.items():
        save_file({name: tensors[name] for name in shard_names}, sharded / shard, metadata={"format": "pt"})
        weight_map.update({name: shard for name in shard_names})
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

    model = adapted(sharded)
    ids = random_input_ids(2, 12)
    with torch.no_grad():
        expected = model(ids).logits
    output = save_merged_packed(model, sharded, tmp_path / "merged")
    assert sorted(path.name for path in output.glob("*.safetensors")) == sorted(halves)
    assert changed_checkpoint_tensors(sharded, output) == []
    index = json.loads((output / "model.safetensors.index.json").read_text())["weight_map"]
    for name, shard in index.items():
        if name.endswith(".bias"):  # beside its module's packed weight
            assert index[name[: -len(".bias")] + ".weight_packed"] == shard
    assert sum(name.endswith(".bias") for name in index) == 8
    with torch.no_grad():
        logits = AutoModelForCausalLM.from_pretrained(output, device_map="cpu")(ids).logits
    assert (logits - expected).abs().max().item() <= TOLERANCE
