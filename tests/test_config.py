import json

import pytest

from peft_restorelcc import RestoreLCCConfig


def test_heads_survive_a_json_round_trip(tmp_path):
    config = RestoreLCCConfig(heads={3: [5, 1], 0: [2]}, num_components=4, task_type="CAUSAL_LM")
    config.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    assert raw["peft_type"] == "RESTORELCC"
    assert raw["heads"] == {"0": [2], "3": [1, 5]}
    loaded = RestoreLCCConfig.from_pretrained(tmp_path)
    assert loaded.heads == {0: [2], 3: [1, 5]}
    assert all(isinstance(layer, int) for layer in loaded.heads)
    assert loaded.num_components == 4


@pytest.mark.parametrize("heads", [None, {}])  # {1: []} and duplicates are refused: tests/test_faults.py
def test_empty_heads_mean_every_head(heads):
    assert RestoreLCCConfig(heads=heads).heads is None


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"heads": {-1: [0]}}, "negative layer index"),
        ({"heads": {0: [-2]}}, "negative head indices"),
        ({"heads": {0: ["x"]}}, "integer head indices"),
        ({"heads": [0, 1]}, "must be a mapping"),
        ({"heads": 4}, "must be a mapping"),  # a count is the CLI's --heads, not the config's
        ({"num_components": 0}, "num_components must be >= 1"),
        ({"num_components": 9, "head_dim": 8}, "exceeds head_dim"),
        ({"use_components": False, "use_bias": False}, "nothing to train"),
        ({"init_std": -1.0}, "init_std"),
    ],
)
def test_bad_config_values_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RestoreLCCConfig(**kwargs)
