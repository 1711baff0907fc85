"""Measuring recovery: stage timing, trainable parameters, sparsity after merging, and the statistics of a gap
recovered (paired standard errors over the same items, tasks above chance).

The stages themselves (prune, calibrate, train, evaluate, merge) live in ``peft_restorelcc.pipeline``.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..io.devices import input_device


def _reset_peak_rss() -> bool:
    """Reset the kernel's record of this process's peak resident memory (Linux: VmHWM); False where it cannot."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int | None:
    """The process's peak resident memory since start or the last reset (Linux), else None."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(r"^VmHWM:\s+(\d+)\s+kB", status, flags=re.MULTILINE)
    return int(match.group(1)) * 1024 if match else None


@dataclass
class StageTimer:
    """Wall-clock seconds and peak memory per named stage, in the order the stages ran.

    The peak is the whole process's resident memory at its highest during the stage (the model, the data and
    everything the stage allocated), read from the kernel, and on a GPU the peak allocated device memory. The kernel
    keeps one peak per process, reset at each stage start, so an outside tool reading it at exit
    (``/usr/bin/time -v``'s maximum resident set size) sees the last stage's only: ``process_peak_rss_gib`` is the
    whole run's, every peak folded in before it is reset.
    """

    seconds: dict[str, float] = field(default_factory=dict)
    peak_rss_gib: dict[str, float] = field(default_factory=dict)
    peak_gpu_gib: dict[str, float] = field(default_factory=dict)
    process_peak_rss_gib: float = 0.0

    def _fold_process_peak(self) -> None:
        peak = peak_rss_bytes()
        if peak is not None:
            self.process_peak_rss_gib = max(self.process_peak_rss_gib, round(peak / 2**30, 3))

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self._fold_process_peak()  # what came before this stage (loading, an earlier stage) is kept
        measured = _reset_peak_rss()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
            peak = peak_rss_bytes() if measured else None
            if peak is not None:
                self.peak_rss_gib[name] = max(self.peak_rss_gib.get(name, 0.0), round(peak / 2**30, 3))
            self._fold_process_peak()
            if torch.cuda.is_available():
                gpu = torch.cuda.max_memory_allocated() / 2**30
                self.peak_gpu_gib[name] = max(self.peak_gpu_gib.get(name, 0.0), round(gpu, 3))


def trainable_parameters(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)


def gap_recovered(dense_accuracy: float, pruned_accuracy: float, accuracy: float) -> float | None:
    """Share of the dense-pruned accuracy gap that a restored model closes (1.0 = back to dense)."""
    gap = dense_accuracy - pruned_accuracy
    if abs(gap) < 1e-12:
        return None
    return (accuracy - pruned_accuracy) / gap


def headline_metric(metrics: dict[str, Any]) -> str:
    """The metric a task is reported by: acc_norm where the task has it, else acc (lm-eval's usual headline)."""
    return "acc" if metrics.get("acc_norm") is None else "acc_norm"


def headline_items(results: dict[str, Any]) -> dict[str, np.ndarray] | None:
    """Each task's per-item 0/1 scores of the headline metric (acc_norm where the task has it, else acc), or None
    when the results were evaluated without ``per_item``."""
    if "items" not in results:
        return None
    headline = {}
    for task, metrics in results["tasks"].items():
        headline[task] = item_scores(results["items"][task][headline_metric(metrics)])
    return headline


def item_scores(scores: str) -> np.ndarray:
    """A string of per-item scores as ``evaluate_tasks(per_item=True)`` writes them ("0110...") as a 0/1 array."""
    return np.frombuffer(scores.encode(), dtype=np.uint8) - ord("0")


def _stderr_of_mean_over_tasks(per_item: dict[str, np.ndarray]) -> float | None:
    # The headline is an unweighted mean of task means: its variance is the tasks' variances of the mean over T^2.
    if any(len(values) < 2 for values in per_item.values()):
        return None
    variance = sum(np.var(values.astype(float), ddof=1) / len(values) for values in per_item.values())
    return math.sqrt(variance) / len(per_item)


def _same_items(*item_sets: dict[str, np.ndarray]) -> None:
    first = item_sets[0]
    for other in item_sets[1:]:
        if other.keys() != first.keys() or any(len(other[task]) != len(first[task]) for task in first):
            raise ValueError(
                "paired standard errors need results on the same tasks and items; evaluate every model with the"
                " same --tasks and --limit"
            )


def paired_stderr(items_a: dict[str, np.ndarray], items_b: dict[str, np.ndarray]) -> float | None:
    """Standard error of the difference of two models' headline accuracies measured on the same items (from
    ``headline_items``). Items both models get right, or both wrong, add no noise to the difference, which makes
    it smaller than the two accuracies' own errors combined. The scores may also be each item's mean over several
    training seeds. None with a single item in a task."""
    _same_items(items_a, items_b)
    return _stderr_of_mean_over_tasks({task: items_a[task].astype(float) - items_b[task] for task in items_a})


def gap_recovered_stderr(
    dense_items: dict[str, np.ndarray], pruned_items: dict[str, np.ndarray], restored_items: dict[str, np.ndarray]
) -> float | None:
    """Standard error, from the sampling of items, of ``gap_recovered`` for three models measured on the same items
    (first order, the delta method: the error of (restored - pruned) - g * (dense - pruned) at the measured share g,
    over the gap). It does not include the spread between training seeds. None when there is no gap."""
    _same_items(dense_items, pruned_items, restored_items)
    dense, pruned, restored = (
        {task: values.astype(float) for task, values in items.items()}
        for items in (dense_items, pruned_items, restored_items)
    )
    dense_mean, pruned_mean, restored_mean = (
        sum(values.mean() for values in items.values()) / len(items) for items in (dense, pruned, restored)
    )
    share = gap_recovered(dense_mean, pruned_mean, restored_mean)
    if share is None:
        return None
    linearised = {task: (restored[task] - pruned[task]) - share * (dense[task] - pruned[task]) for task in dense}
    error = _stderr_of_mean_over_tasks(linearised)
    return None if error is None else error / abs(dense_mean - pruned_mean)


# One-sided 5%: a task counts as above chance when the dense model beats a question-blind answer by this many
# standard errors of its own accuracy.
ABOVE_CHANCE_Z = 1.645


def tasks_above_chance(
    accuracies: dict[str, float],
    chance: dict[str, float | None],
    item_counts: dict[str, int],
    z: float = ABOVE_CHANCE_Z,
) -> list[str]:
    """The tasks on which a model (the dense one) scores above chance (``chance_accuracy``) by more than ``z``
    standard errors. A model at chance on a task has nothing there for pruning to remove or recovery to give back:
    such a task only adds noise to the gap, or inverts it (a pruned model that always answers "yes" beats a dense
    model at chance on BoolQ). Chosen from the dense model alone, so the choice does not depend on any result. A task
    whose chance level is unknown (None: a task of lm-eval's registry) is not counted as above it."""
    above = []
    for task, accuracy in accuracies.items():
        if chance.get(task) is None:
            continue
        stderr = math.sqrt(max(accuracy * (1.0 - accuracy), 1e-12) / item_counts[task])
        if (accuracy - chance[task]) / stderr > z:
            above.append(task)
    return above


def gap_recovered_on(
    tasks: list[str], dense_tasks: dict[str, float], pruned_tasks: dict[str, float], restored_tasks: dict[str, float]
) -> float | None:
    """``gap_recovered`` of the mean headline accuracy over ``tasks`` only (per-task accuracies in, as rows hold
    them). None when no task is given or there is no gap."""
    if not tasks:
        return None
    dense, pruned, restored = (sum(values[task] for task in tasks) / len(tasks)
                               for values in (dense_tasks, pruned_tasks, restored_tasks))  # fmt: skip
    return gap_recovered(dense, pruned, restored)


def headline_accuracy(results: dict[str, Any]) -> float:
    """The average over tasks of acc_norm where a task has it, else acc (lm-eval's usual headline numbers)."""
    values = [metrics[headline_metric(metrics)] for metrics in results["tasks"].values()]
    return sum(values) / len(values)


def headline_stderr(results: dict[str, Any]) -> float | None:
    """Standard error of ``headline_accuracy``: the tasks' own standard errors combined as for a mean of independent
    estimates. None when a task has none (a single item)."""
    errors = []
    for metrics in results["tasks"].values():
        error = metrics.get(f"{headline_metric(metrics)}_stderr")
        if error is None:
            return None
        errors.append(error)
    return math.sqrt(sum(error**2 for error in errors)) / len(errors)


def training_memory_bytes(model: nn.Module, batch: dict[str, Any]) -> int:
    """Bytes one training step must hold beyond the frozen weights: tensors saved for backward, gradients of the
    trainable parameters and AdamW's two moments. Deterministic, so methods compare on CPU too, where torch keeps
    no allocator statistics. Runs one forward/backward and clears the gradients; the weights do not change."""
    saved_bytes = 0

    def pack(tensor: Any) -> Any:
        nonlocal saved_bytes
        saved_bytes += tensor.numel() * tensor.element_size()
        return tensor

    device = input_device(model)
    batch = {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}
    was_training = model.training
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(**batch).loss
    loss.backward()
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    for parameter in trainable:
        parameter.grad = None
    model.train(was_training)
    parameter_bytes = sum(parameter.numel() * parameter.element_size() for parameter in trainable)
    return saved_bytes + 3 * parameter_bytes  # gradient + AdamW exp_avg + exp_avg_sq
