"""benchmarks/head_choice.py: the heads each RestoreLCC row compensated, from cached components and results."""

import json

import pytest
import torch
from benchmark_scripts import load_benchmark

from peft_restorelcc.calibration import LostComponents, score_heads, select_heads


@pytest.fixture(scope="module")
def head_choice():
    return load_benchmark("head_choice")


def components(layers: int = 6, heads: int = 4, d: int = 2) -> LostComponents:
    total = layers * heads
    return LostComponents(
        layer_indices=list(range(layers)),
        heads_per_layer=[heads] * layers,
        head_dim=d,
        basis=torch.eye(d).expand(total, d, d).clone(),
        singular_values=torch.ones(total, d),
        mean=torch.ones(total, d),
        scores=torch.arange(total, dtype=torch.float32),  # the probe prefers the last heads of the deepest layers
    )


def test_describe_counts_shared_heads_layers_and_thirds(head_choice):
    facts = head_choice.describe({0: [0, 1], 5: [2]}, {0: [1], 3: [0]}, num_layers=6)
    assert facts == {"heads": 3, "shared": 1, "layers": 2, "thirds": [2, 0, 1]}


def test_selections_follow_the_probe_scores_and_each_reselection(head_choice):
    measured = components()
    chosen = head_choice.selections(measured, 0.25, ["draw"], lambda c, name: score_heads(c, "random", seed=3))
    assert chosen["restorelcc"] == {4: [2, 3], 5: [0, 1, 2, 3]}  # the 6 top-scored of 24
    assert chosen["draw"] == select_heads(score_heads(measured, "random", seed=3), 0.25)
    assert chosen["draw"] != chosen["restorelcc"]


def test_main_prints_each_row_beside_its_results(head_choice, tmp_path, monkeypatch, capsys):
    cached = tmp_path / "recovery-work" / "cache" / "tiny" / "lost_components"
    components().save(cached)
    rows = [{"method": "restorelcc", "ppl": 70.0, "ppl_std": 0.1, "gap_recovered_ppl": 0.4, "seeds": [0, 1]}]
    results = tmp_path / "recovery.json"
    results.write_text(json.dumps({"settings": {"heads": 0.25}, "rows": rows}))
    monkeypatch.setattr("sys.argv", ["head_choice.py", "--results", str(results)])
    head_choice.main()
    out = capsys.readouterr().out
    assert "| restorelcc | 6 | 6 | 2 | 0 / 0 / 6 | 70.00 ± 0.10 | 40% | 0,1 |" in out
    assert "| restorelcc-random-draw1 | 6 |" in out and "not run" in out  # a selection with no results yet
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
