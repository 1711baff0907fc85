"""Models larger than one device: pruning and calibration of models dispatched by accelerate (``device_map``, CPU
and disk offload) give what the in-memory model gives, and calibration holds one model at a time."""

from __future__ import annotations

import gc
import json
import weakref

import pytest
import torch
from accelerate import cpu_offload
from safetensors.torch import load_file
from test_training import char_tokenizer
from tiny_models import make_tiny_model, random_input_ids

from peft_restorelcc.calibration import ModelLoader, calibrate
from peft_restorelcc.cli import main
from peft_restorelcc.io import load_model, model_loader
from peft_restorelcc.io.devices import parse_device_map
from peft_restorelcc.pruning import measure_sparsity, prune_model

# Layer 1 and the LM head on disk (read from the checkpoint by accelerate), the rest in memory.
DISK_MAP = {
    "model.embed_tokens": "cpu",
    "model.rotary_emb": "cpu",
    "model.layers.0": "cpu",
    "model.layers.1": "disk",
    "model.norm": "cpu",
    "lm_head": "disk",
}
PROMPTS = [list(range(3, 15)), list(range(5, 20)), list(range(40, 52)), list(range(60, 70))]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("device_map")
    dense = make_tiny_model("llama")
    dense.save_pretrained(root / "dense")
    char_tokenizer().save_pretrained(root / "dense")
    pruned = make_tiny_model("llama")
    prune_model(pruned, "magnitude", 0.5, progress=False)
    pruned.save_pretrained(root / "pruned")
    return root


def offloaded(path, how: str):
    if how == "disk":
        return load_model(path, device_map=DISK_MAP)
    return cpu_offload(load_model(path), execution_device=torch.device("cpu"))


@pytest.mark.parametrize("how", ["disk", "cpu"])
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_pruning_an_offloaded_model_equals_pruning_it_in_memory(saved, how, method):
    ids = random_input_ids(4, 16)
    reference = load_model(saved / "dense")
    prune_model(reference, method, 0.5, calibration_input_ids=ids, progress=False)
    model = offloaded(saved / "dense", how)
    assert model.model.layers[1].mlp.up_proj.weight.device.type == "meta"  # really offloaded
    report = prune_model(model, method, 0.5, calibration_input_ids=ids, progress=False)
    assert report["overall_sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert measure_sparsity(model) == measure_sparsity(reference)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)


def test_the_offloaded_checkpoint_is_left_as_it_was(saved):
    before = load_file(saved / "dense" / "model.safetensors")
    prune_model(offloaded(saved / "dense", "disk"), "wanda", 0.5, calibration_input_ids=random_input_ids(4, 16),
                progress=False)  # fmt: skip
    after = load_file(saved / "dense" / "model.safetensors")
    assert all(torch.equal(before[key], after[key]) for key in before)


def test_calibration_of_offloaded_models_equals_in_memory(saved):
    reference = calibrate(
        load_model(saved / "dense"), load_model(saved / "pruned"), PROMPTS, strategy="lost_norm", progress=False
    )
    components = calibrate(
        model_loader(saved / "dense", device_map=DISK_MAP),
        model_loader(saved / "pruned", device_map=DISK_MAP),
        PROMPTS,
        strategy="lost_norm",
        progress=False,
    )
    for name in ("basis", "singular_values", "mean", "output_metric"):
        torch.testing.assert_close(getattr(components, name), getattr(reference, name), rtol=1e-5, atol=1e-6)


def test_calibration_releases_the_pruned_model_before_the_dense_one_loads(saved):
    live: dict[str, weakref.ref] = {}
    resident_at_dense_load = []

    def load(name):
        def loader():
            gc.collect()
            resident_at_dense_load.append([other for other, ref in live.items() if ref() is not None])
            model = load_model(saved / name)
            live[name] = weakref.ref(model)
            return model

        return ModelLoader(loader, config=load_model(saved / name).config, name=name)

    calibrate(load("dense"), load("pruned"), PROMPTS, strategy="lost_norm", progress=False)
    # The pruned model loads first with nothing resident; when the dense one loads, the pruned one is gone.
    assert resident_at_dense_load == [[], []]
    gc.collect()
    assert all(ref() is None for ref in live.values())


def test_calibrate_cli_accepts_a_device_map(saved, tmp_path):
    outputs = {}
    for label, extra in (("device", ["--device", "cpu"]), ("map", ["--device-map", json.dumps(DISK_MAP)])):
        outputs[label] = tmp_path / label
        argv = ["calibrate", "--dense", str(saved / "dense"), "--pruned", str(saved / "pruned"), "--num-heads", "3",
                "--output", str(outputs[label]), "--strategy", "lost_norm", "--samples", "6", "--max-length", "40",
                "--batch-size", "3", *extra]  # fmt: skip
        assert main(argv) == 0
    ours = load_file(outputs["map"] / "lost_components" / "lost_components.safetensors")
    plain = load_file(outputs["device"] / "lost_components" / "lost_components.safetensors")
    for key in plain:
        torch.testing.assert_close(ours[key], plain[key], rtol=1e-5, atol=1e-6)


def test_parse_device_map():
    assert parse_device_map(None) is None
    assert parse_device_map("auto") == "auto"
    assert parse_device_map("cpu") == {"": "cpu"}
    assert parse_device_map('{"model.layers.0": "disk"}') == {"model.layers.0": "disk"}
    with pytest.raises(ValueError, match="JSON"):
        parse_device_map("{not json")
