"""benchmarks/head_choice.py: the heads each RestoreLCC row compensated, from cached components and results."""

import json

import pytest
import torch
from benchmark_scripts import load_benchmark
from tiny_models import grid_components

from peft_restorelcc.calibration import LostComponents, score_heads, select_heads


@pytest.fixture(scope="module")
def head_choice():
    return load_benchmark("head_choice")


def components(layers: int = 6, heads: int = 4) -> LostComponents:
    # The probe prefers the last heads of the deepest layers.
    return grid_components(layers, heads, scores=torch.arange(layers * heads, dtype=torch.float32))


def test_describe_counts_shared_heads_layers_and_thirds(head_choice):
    facts = head_choice.describe({0: [0, 1], 5: [2]}, {0: [1], 3: [0]}, num_layers=6)
    assert facts == {"heads": 3, "shared": 1, "layers": 2, "thirds": [2, 0, 1]}


def test_selections_take_each_rows_heads_from_the_recovery_benchmark(head_choice):
    measured = components()
    rows = ["restorelcc", "restorelcc-random-draw1", "restorelcc-instruction-per-layer"]
    chosen = head_choice.selections(measured, 0.25, rows)
    assert chosen["restorelcc"] == {4: [2, 3], 5: [0, 1, 2, 3]}  # the 6 top-scored of 24
    assert chosen["restorelcc-random-draw1"] == select_heads(score_heads(measured, "random", seed=1), 0.25)
    assert chosen["restorelcc-instruction-per-layer"] == {layer: [3] for layer in range(6)}  # each layer's best


def test_main_prints_each_row_beside_its_results(head_choice, tmp_path, monkeypatch, capsys):
    cached = tmp_path / "recovery-work" / "cache" / "tiny" / "lost_components"
    components().save(cached)
    measured = {"ppl": 70.0, "ppl_std": 0.1, "gap_recovered_ppl": 0.4, "avg_acc": 0.38, "seeds": [0, 1]}
    rows = [{"method": "restorelcc"} | measured]
    results = tmp_path / "recovery.json"
    results.write_text(json.dumps({"settings": {"heads": 0.25}, "rows": rows}))
    monkeypatch.setattr("sys.argv", ["head_choice.py", "--results", str(results)])
    head_choice.main()
    out = capsys.readouterr().out
    assert "| restorelcc | 6 | 6 | 2 | 0 / 0 / 6 | 70.00 ± 0.10 | 40% | 0.380 | 0,1 |" in out
    assert "| restorelcc-random-draw1 | 6 |" in out and "not run" in out  # a selection with no results yet
    # The paper's recipe on the probe's top heads sits beside the same recipe on other heads.
    lines = [line.split(" | ")[0] for line in out.splitlines() if line.startswith("| restorelcc-instruction")]
    assert lines == ["| restorelcc-instruction", "| restorelcc-instruction-per-layer", "| restorelcc-instruction-random"]
    # Components that are not there, or none cached beside the results: clear errors that name the fix.
    monkeypatch.setattr("sys.argv", ["head_choice.py", "--results", str(results), "--components", str(tmp_path / "x")])
    with pytest.raises(SystemExit):
        head_choice.main()
    assert "no lost_components.safetensors in" in capsys.readouterr().err
    (tmp_path / "other").mkdir()
    other = tmp_path / "other" / "recovery.json"
    other.write_text(results.read_text())
    monkeypatch.setattr("sys.argv", ["head_choice.py", "--results", str(other)])
    with pytest.raises(SystemExit):
        head_choice.main()
    assert "pass --components DIR" in capsys.readouterr().err
