"""Adapters saved by earlier versions still load with the same weights.

``tests/data/adapter_v0_1_0`` was written by peft_restorelcc 0.1.0, when ``init_weights: true`` meant N(0, init_std)
(now it means the identity init). The saved weights must override whatever the initialisation gives, so the loaded
adapter is the saved one whatever ``init_weights`` now means.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from tiny_models import make_tiny_model, random_input_ids

from peft_restorelcc import RestoreLCCConfig, restorelcc_layers

OLD_ADAPTER = Path(__file__).parent / "data" / "adapter_v0_1_0"


def test_the_old_config_loads_with_its_old_init_weights_value():
    config = RestoreLCCConfig.from_pretrained(OLD_ADAPTER)
    assert config.init_weights is True
    assert config.heads == {0: [1], 1: [0, 3]} and config.num_components == 4


@pytest.mark.parametrize("low_cpu_mem_usage", [False, True])
def test_old_adapter_loads_with_the_saved_weights(low_cpu_mem_usage):
    saved = load_file(OLD_ADAPTER / "adapter_model.safetensors")
    model = PeftModel.from_pretrained(make_tiny_model("llama"), OLD_ADAPTER, low_cpu_mem_usage=low_cpu_mem_usage)
    loaded = {
        name.replace(".default", ""): tensor
        for name, tensor in model.state_dict().items()
        if "restorelcc_" in name and "head_index" not in name
    }
    saved = {name.removeprefix("base_model.model."): tensor for name, tensor in saved.items()}
    loaded = {name.removeprefix("base_model.model."): tensor for name, tensor in loaded.items()}
    assert loaded.keys() == saved.keys()
    for name, tensor in saved.items():
        assert loaded[name].dtype == torch.float32
        assert torch.equal(loaded[name], tensor), name
    # Not the identity init the config's init_weights=True gives today: the saved magnitudes and biases are there.
    assert all(tensor.abs().max() > 0 for name, tensor in saved.items() if "basis" not in name)

    # And they mean what they meant: the same input shift as 0.1.0 computed from them.
    expected = json.loads((OLD_ADAPTER / "expected_input_shift.json").read_text())
    for layer in restorelcc_layers(model):
        shift = layer.input_shift(["default"])
        torch.testing.assert_close(shift, torch.tensor(expected[str(layer.layer_index)]), rtol=0, atol=1e-7)

    inputs = random_input_ids()
    assert (model(inputs).logits - make_tiny_model("llama")(inputs).logits).abs().max() > 1e-3
