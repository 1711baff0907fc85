"""The numbers the main job reports: headline accuracy, its standard error, the share of the gap recovered and
the paired standard errors of differences measured on the same items."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from peft_restorelcc.evaluation.statistics import (
    gap_recovered,
    gap_recovered_on,
    gap_recovered_stderr,
    headline_accuracy,
    headline_items,
    headline_stderr,
    paired_stderr,
    tasks_above_chance,
)

RESULTS = {
    "tasks": {
        "boolq": {"acc": 0.6, "acc_stderr": 0.03, "acc_norm": None, "acc_norm_stderr": None},
        "hellaswag": {"acc": 0.3, "acc_stderr": 0.02, "acc_norm": 0.4, "acc_norm_stderr": 0.04},
    }
}


def test_headline_takes_acc_norm_where_a_task_has_it():
    assert headline_accuracy(RESULTS) == pytest.approx((0.6 + 0.4) / 2)


def test_headline_stderr_combines_the_tasks_errors_of_the_same_metric():
    assert headline_stderr(RESULTS) == pytest.approx(math.sqrt(0.03**2 + 0.04**2) / 2)
    single_item = {"tasks": {"rte": {"acc": 1.0, "acc_stderr": None, "acc_norm": None}}}
    assert headline_stderr(single_item) is None


def test_gap_recovered_is_the_share_of_the_dense_pruned_gap():
    assert gap_recovered(0.5, 0.3, 0.45) == pytest.approx(0.75)
    assert gap_recovered(0.5, 0.3, 0.2) == pytest.approx(-0.5)
    assert gap_recovered(0.4, 0.4, 0.5) is None  # no gap, no share


def _items(**tasks: list[int]) -> dict[str, np.ndarray]:
    return {task: np.array(values, dtype=np.uint8) for task, values in tasks.items()}


def test_headline_items_decode_the_headline_metric_of_each_task():
    results = RESULTS | {
        "items": {
            "boolq": {"acc": "101", "acc_norm": "101"},
            "hellaswag": {"acc": "0011", "acc_norm": "1100"},
        }
    }
    items = headline_items(results)
    assert items["boolq"].tolist() == [1, 0, 1]
    assert items["hellaswag"].tolist() == [1, 1, 0, 0]  # acc_norm, as in headline_accuracy
    assert headline_items(RESULTS) is None  # evaluated without per_item


def test_paired_stderr_by_hand():
    # Differences 1, 0, 0, 1: sample variance 1/3, over 4 items; the mean over two tasks halves the error.
    a, b = _items(rte=[1, 0, 1, 1]), _items(rte=[0, 0, 1, 0])
    assert paired_stderr(a, b) == pytest.approx(math.sqrt(1 / 3 / 4))
    assert paired_stderr(a | {"copa": a["rte"]}, b | {"copa": b["rte"]}) == pytest.approx(math.sqrt(2 / 12) / 2)
    assert paired_stderr(a, a) == 0.0  # the same answers: no noise in their difference
    assert paired_stderr(_items(rte=[1]), _items(rte=[0])) is None


def test_paired_stderr_is_below_the_unpaired_one_when_models_mostly_agree():
    rng = np.random.default_rng(0)
    pruned = rng.random(1000) < 0.5
    restored = np.where(rng.random(1000) < 0.1, ~pruned, pruned)  # 10% of the answers change
    unpaired = math.sqrt(pruned.var(ddof=1) / 1000 + restored.var(ddof=1) / 1000)
    paired = paired_stderr({"t": restored.astype(np.uint8)}, {"t": pruned.astype(np.uint8)})
    assert paired < 0.5 * unpaired


def test_gap_recovered_stderr_agrees_with_a_bootstrap_over_items():
    rng = np.random.default_rng(1)
    dense, pruned, restored = {}, {}, {}
    for task, size in (("boolq", 600), ("rte", 300), ("arc_easy", 400)):
        pruned[task] = (rng.random(size) < 0.5).astype(np.uint8)
        dense[task] = np.maximum(pruned[task], rng.random(size) < 0.4).astype(np.uint8)  # right on more items
        restored[task] = np.where(rng.random(size) < 0.6, dense[task], pruned[task]).astype(np.uint8)
    bootstrap = []
    for _ in range(2000):
        picks = {task: rng.integers(0, len(values), len(values)) for task, values in dense.items()}
        means = [np.mean([model[task][picks[task]].mean() for task in picks]) for model in (dense, pruned, restored)]
        bootstrap.append(gap_recovered(*means))
    assert gap_recovered_stderr(dense, pruned, restored) == pytest.approx(np.std(bootstrap), rel=0.1)


def test_gap_recovered_stderr_is_none_without_a_gap_and_refuses_other_items():
    same = _items(rte=[1, 0, 1, 0])
    assert gap_recovered_stderr(same, same, _items(rte=[1, 1, 1, 0])) is None
    with pytest.raises(ValueError, match="same --tasks and --limit"):
        gap_recovered_stderr(same, same, _items(rte=[1, 0, 1]))
    with pytest.raises(ValueError, match="same --tasks and --limit"):
        paired_stderr(same, _items(copa=[1, 0, 1, 0]))


def test_tasks_above_chance_are_those_the_model_beats_a_blind_answer_on_by_more_than_z_standard_errors():
    chance = {"boolq": 0.62, "hellaswag": 0.25, "winogrande": 0.5, "openbookqa": 0.25}
    accuracies = {"boolq": 0.52, "hellaswag": 0.46, "winogrande": 0.49, "openbookqa": 0.30}
    counts = {"boolq": 300, "hellaswag": 300, "winogrande": 300, "openbookqa": 300}
    # OpenBookQA: 0.05 over chance with a standard error of sqrt(0.3 * 0.7 / 300) = 0.0265, so z = 1.89.
    assert tasks_above_chance(accuracies, chance, counts) == ["hellaswag", "openbookqa"]
    assert tasks_above_chance(accuracies, chance, counts, z=2.0) == ["hellaswag"]
    # Fewer items, larger error: the same lead no longer counts.
    assert tasks_above_chance(accuracies, chance, counts | {"openbookqa": 100}) == ["hellaswag"]
    # Below chance (a dense model that loses to always answering "yes") never counts, whatever the item count.
    assert "boolq" not in tasks_above_chance(accuracies, chance, counts | {"boolq": 10**6})


def test_gap_recovered_on_some_tasks_averages_only_those():
    dense, pruned = {"boolq": 0.5, "hellaswag": 0.5, "arc_easy": 0.4}, {"boolq": 0.8, "hellaswag": 0.3, "arc_easy": 0.3}
    restored = {"boolq": 0.8, "hellaswag": 0.4, "arc_easy": 0.35}
    # Over all three the gap is 0 (the pruned model's BoolQ lead cancels its losses): nothing to measure.
    assert gap_recovered(sum(dense.values()) / 3, sum(pruned.values()) / 3, sum(restored.values()) / 3) is None
    # Over the other two: dense 0.45, pruned 0.30, restored 0.375.
    assert gap_recovered_on(["hellaswag", "arc_easy"], dense, pruned, restored) == pytest.approx(0.5)
    assert gap_recovered_on([], dense, pruned, restored) is None


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="per-stage peak memory is read from Linux /proc")
def test_stage_timer_records_each_stages_own_peak_memory() -> None:
    from peft_restorelcc.evaluation.statistics import StageTimer

    timer = StageTimer()
    with timer.stage("small"):
        torch.ones(1000).sum()
    with timer.stage("large"):
        torch.ones(100_000_000).sum()  # 400 MB, freed at the end of the stage
    with timer.stage("small again"):
        torch.ones(1000).sum()
    assert timer.peak_rss_gib["large"] - timer.peak_rss_gib["small"] > 0.3
    # The peak is reset at each stage: the earlier allocation does not carry over ...
    assert timer.peak_rss_gib["small again"] < timer.peak_rss_gib["large"] - 0.3
    # ... but the whole run's peak keeps it (the kernel's own counter, read at exit, would not).
    assert timer.process_peak_rss_gib >= timer.peak_rss_gib["large"]
