"""benchmarks/task_specific.py: its arguments and its results file (the run itself is the benchmark's)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from benchmark_scripts import load_benchmark

task_specific = load_benchmark("task_specific")


def _arm(args, items: str, command: str = "python benchmarks/task_specific.py") -> dict:
    return {"settings": task_specific.settings_of(args), "pruned_fingerprint": "same", "metric": "acc_norm",
            "accuracy": items.count("1") / len(items), "items": items, "command": command, "seconds": {}}  # fmt: skip


def test_arguments_default_to_the_documented_run_and_check_the_held_out_items() -> None:
    args = task_specific.parse_args([])
    assert (args.task, args.method, args.sparsity, args.steps, args.batch_size) == ("hellaswag", "wanda", 0.5, 200, 8)
    assert args.arms == ["general", "task"] and args.output == "benchmarks/results/task-specific-hellaswag"
    assert task_specific.parse_args(["--task", "boolq", "--arms", "pruned,task"]).arms == ["pruned", "task"]
    with pytest.raises(SystemExit):
        task_specific.parse_args(["--arms", "lora"])
    with pytest.raises(SystemExit):
        task_specific.parse_args(["--eval-items", "400", "--scored-items", "300"])  # would score training items


def test_results_hold_every_arm_and_the_paired_difference(tmp_path: Path) -> None:
    args = task_specific.parse_args(["--output", str(tmp_path)])
    settings = task_specific.settings_of(args)
    arms = {"pruned": _arm(args, "0010"), "general": _arm(args, "0110"), "task": _arm(args, "1111", "python b")}
    for name, arm in arms.items():
        task_specific.write_json(tmp_path / "arms" / f"{name}.json", arm)
    task_specific._write_results(tmp_path, settings, "python benchmarks/task_specific.py")
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["accuracy"] == {"pruned": 0.25, "general": 0.5, "task": 1.0}
    assert results["items"]["task"] == "1111" and results["settings"] == settings
    difference = results["differences"]["task - general"]
    # Differences 1, 0, 0, 1 (task - general per item): mean 0.5, paired SE sqrt(var / n) = sqrt(1/3 / 4).
    assert difference["difference"] == 0.5 and difference["stderr"] == pytest.approx((1 / 3 / 4) ** 0.5)
    assert results["differences"]["general - pruned"]["difference"] == 0.25
    assert results["commands"] == ["python b", "python benchmarks/task_specific.py"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["arms", "results.json"]  # no staging file left


def test_arms_of_other_settings_or_models_are_not_compared(tmp_path: Path) -> None:
    args = task_specific.parse_args(["--output", str(tmp_path)])
    other = task_specific.parse_args(["--output", str(tmp_path), "--steps", "5"])
    task_specific.write_json(tmp_path / "arms" / "general.json", _arm(args, "01"))
    task_specific.write_json(tmp_path / "arms" / "task.json", _arm(other, "11"))
    task_specific._write_results(tmp_path, task_specific.settings_of(args), "python x")
    assert not (tmp_path / "results.json").exists()
    arms = {"general": _arm(args, "01"), "task": _arm(args, "11") | {"pruned_fingerprint": "other"}}
    with pytest.raises(ValueError, match="different pruned models"):
        task_specific.combine(arms, task_specific.settings_of(args), "python x")
