"""benchmarks/scaling.py: the whole code path (build, prune, calibrate, train, each in a subprocess) on a tiny shape."""

import json
import math

import pytest
import torch
from benchmark_scripts import load_benchmark
from transformers import AutoModelForCausalLM


@pytest.fixture(scope="module")
def scaling():
    return load_benchmark("scaling")


def test_growth_exponent_is_the_slope_of_a_power_law(scaling):
    params = [1e8, 4e8, 1.6e9]
    assert scaling.growth_exponent(params, [3 * p**1.5 for p in params]) == pytest.approx(1.5)
    assert scaling.growth_exponent(params, [7.0 * p for p in params]) == pytest.approx(1.0)
    assert scaling.growth_exponent([1e8], [2.0]) is None


@pytest.mark.parametrize("shape", ["135m", "360m", "1b", "3b", "7b"])
def test_shapes_have_the_released_models_sizes(scaling, shape):
    # Built on the meta device: the parameter count without allocating the weights.
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(scaling.llama_config(shape))
    expected = {"135m": 134.5e6, "360m": 361.8e6, "1b": 1235.8e6, "3b": 3212.7e6, "7b": 6738.4e6}[shape]
    assert model.num_parameters() == pytest.approx(expected, rel=1e-3)


def test_tiny_run_writes_every_stage_with_its_memory_and_a_plot(scaling, tmp_path):
    output = tmp_path / "scaling.json"
    document = scaling.main(["--shapes", "tiny", "--output", str(output), "--work-dir", str(tmp_path / "work")])
    written = json.loads(output.read_text())
    assert written["rows"] == json.loads(json.dumps(document["rows"]))
    assert [row["stage"] for row in written["rows"]] == ["prune", "calibrate", "train"]
    for row in written["rows"]:
        assert row["shape"] == "tiny" and row["params"] > 0
        assert row["seconds"] > 0 and row["cpu_seconds"] > 0 and row["peak_rss_bytes"] >= row["runtime_rss_bytes"] > 0
        assert math.isclose(
            row["memory_ratio"], row["peak_rss_bytes"] / (row["weight_bytes"] + row["activation_bytes"])
        )
        assert len(row["load_average_before"]) == 3
    prune, _, train = written["rows"]
    assert prune["overall_sparsity"] == pytest.approx(0.5)
    assert train["steps"] == 1 and train["trainable_parameters"] > 0
    # One shape fits no line.
    assert written["exponent"]["prune"]["seconds"] is None
    assert written["total_seconds"] > 0 and written["machine"]["cores"] >= 1 and written["command"].startswith("python benchmarks/scaling.py")
    assert output.with_suffix(".png").stat().st_size > 0
    # The scratch models were removed after the shape.
    assert not (tmp_path / "work" / "tiny").exists()
