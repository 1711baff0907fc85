"""The numbers the main job reports: headline accuracy, its standard error, the share of the gap recovered."""

import math

import pytest

from peft_restorelcc.recovery import gap_recovered, headline_accuracy, headline_stderr

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
