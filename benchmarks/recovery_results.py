"""The recovery benchmark's results file: its rows aggregated over seeds, paired differences, and the merge of earlier
files and shards. Pure bookkeeping over JSON-shaped dicts: no model is loaded here, so a merge runs anywhere."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from report import MEASUREMENT_SETTINGS

from peft_restorelcc.evaluation import statistics as recovery
from peft_restorelcc.evaluation.tasks import chance_accuracy, task_size


def measured_alike(earlier: dict[str, Any], settings: dict[str, Any]) -> bool:
    """Whether an earlier results file measured what these settings measure (where it ran, lm-eval's batch size,
    threads and the rows and seeds it planned do not change a run's numbers; each run records its own recipe)."""
    return all(earlier.get(key) == settings.get(key) for key in MEASUREMENT_SETTINGS)


def trained_as_now(name: str, run: dict[str, Any], table: dict[str, dict[str, Any]]) -> bool:
    """Whether an earlier run was trained as the table's row ``name`` trains it now. A run of a retired row is not
    (a merge drops it instead of keeping it unexplained); a run written before runs recorded their whole recipe is
    compared on what it recorded: data, distillation weight (recorded only when a teacher took part) and rate."""
    if name not in table:
        return False
    row = table[name]
    if "recipe" in run:
        return run["recipe"] == recipe_of(row)
    return (run.get("data"), run.get("distill_alpha"), run.get("learning_rate")) == (
        row["data"], row["distill_alpha"] or None, row["learning_rate"],
    )  # fmt: skip


def recipe_of(row: dict[str, Any]) -> dict[str, Any]:
    """What a run records of its row: every setting but the description."""
    return {key: value for key, value in row.items() if key != "about"}


def finished_runs(
    reports: list[dict[str, Any]], settings: dict[str, Any], table: dict[str, dict[str, Any]]
) -> tuple[dict[str, list[dict[str, Any]]], list[str]]:
    """Runs already in earlier results files measured alike, to be kept, not redone (the benchmark's own file and
    the shards of ``--resume-from``, as read; ``{}``: no file yet), and the runs left out, named (``"row seed N"``):
    those of retired rows and those trained otherwise than the table trains them now. The dense and pruned rows come
    back under ``"__reference__"``: the first file's, unless a later one kept their items and it did not."""
    kept: dict[str, list[dict[str, Any]]] = {}
    dropped: list[str] = []
    seen: set[tuple[str, int]] = set()
    for earlier in reports:
        if not earlier or not measured_alike(earlier["settings"], settings):
            continue
        # Runs of files written before runs recorded their device ran where that file's settings say (None: CPU).
        earlier_device = earlier["settings"].get("device") or "cpu"
        references = [row | {"device": row.get("device", earlier_device)} for row in earlier["rows"] if "runs" not in row]
        if "__reference__" not in kept or (
            all("items" in row for row in references) and not all("items" in row for row in kept["__reference__"])
        ):
            kept["__reference__"] = references
        for row in earlier["rows"]:
            for run in row.get("runs", []):
                if (row["method"], run["seed"]) in seen:
                    continue
                if not trained_as_now(row["method"], run, table):
                    dropped.append(f"{row['method']} seed {run['seed']}")
                    continue
                seen.add((row["method"], run["seed"]))
                kept.setdefault(row["method"], []).append(run | {"device": run.get("device", earlier_device)})
    return kept, list(dict.fromkeys(dropped))


def check_same_models(reference: dict[str, dict[str, Any]], fingerprints: dict[str, str]) -> None:
    """Refuse to add runs to earlier results measured on other dense or pruned weights than these."""
    for name, fingerprint in fingerprints.items():
        earlier = reference.get(name, {}).get("weights_sha256")
        if earlier is not None and earlier != fingerprint:
            raise SystemExit(
                f"the {name} model here (weights sha256 {fingerprint}) is not the one the earlier results measured"
                f" ({earlier}): its runs would be compared with another model's row. Give another --output and no"
                " --resume-from to measure this model apart, or run where the earlier results were made."
            )


def runs_on_other_weights(reference: dict[str, dict[str, Any]], runs: dict[str, list[dict[str, Any]]]) -> list[str]:
    """The runs (``"row seed N"``) that record training on other pruned weights than the pruned row measured."""
    measured = reference.get("pruned", {}).get("weights_sha256")
    return [
        f"{name} seed {run['seed']}"
        for name, row_runs in runs.items()
        for run in row_runs
        if measured is not None and run.get("pruned_weights_sha256") not in (None, measured)
    ]


def json_settings(arguments: dict[str, Any]) -> dict[str, Any]:
    """The command's arguments as the results file records them (paths, and lists of them, as strings)."""

    def plain(value: Any) -> Any:
        return [plain(item) for item in value] if isinstance(value, list) else str(value) if isinstance(value, Path) else value

    return {key: plain(value) for key, value in arguments.items()}


def own_seconds(report: dict[str, Any]) -> float:
    """Seconds a results file's own runs took: its total less the shards merged into it."""
    return report.get("own_seconds", report.get("total_seconds", 0.0) - sum(report.get("shard_seconds", {}).values()))


def shard_times(output: Path, earlier: dict[str, Any], shards: dict[Path, dict[str, Any]]) -> dict[str, float]:
    """Seconds of every results file whose runs a merge into ``output`` holds, each counted once by its path: the
    shards merged into ``output`` before, those given now, and the shards those merged themselves. ``output``'s own
    time is counted apart, so it is left out."""
    seconds = dict(earlier.get("shard_seconds", {}))
    for report in shards.values():
        seconds |= report.get("shard_seconds", {})
    seconds |= {str(path.resolve()): own_seconds(report) for path, report in shards.items()}
    seconds.pop(str(output.resolve()), None)
    return seconds


def decoded_items(row: dict[str, Any], tasks: list[str] | None = None) -> dict[str, Any]:
    """A row's (or run's) kept per-item scores as arrays, for ``tasks`` (all when None)."""
    return {task: recovery.item_scores(scores) for task, scores in row["items"].items() if tasks is None or task in tasks}


def item_noise(
    dense: dict[str, Any], pruned: dict[str, Any], run: dict[str, Any], tasks: list[str] | None = None
) -> float | None:
    """The paired standard error, over items, of a run's share of the accuracy gap over ``tasks`` (the run's when
    None; None where a row was measured before runs kept their items)."""
    if not all("items" in row for row in (dense, pruned, run)) or tasks == []:
        return None
    tasks = list(run["tasks"]) if tasks is None else tasks
    return recovery.gap_recovered_stderr(*(decoded_items(row, tasks) for row in (dense, pruned, run)))


def above_chance(dense: dict[str, Any], limit: int | None) -> dict[str, Any]:
    """The tasks the dense model scores above chance on (``recovery.tasks_above_chance``), with each task's chance
    accuracy on the items measured: the share of the gap over them is the one a model at chance cannot blur."""
    item_counts = {
        task: len(dense["items"][task]) if "items" in dense else min(limit or math.inf, task_size(task))
        for task in dense["tasks"]
    }
    chance = {task: chance_accuracy(task, count) for task, count in item_counts.items()}  # as `restorelcc run` does
    return {
        "tasks": recovery.tasks_above_chance(dense["tasks"], chance, item_counts),
        "chance": chance,
        "z": recovery.ABOVE_CHANCE_Z,
    }


def _mean_spread(values: list[float | None]) -> tuple[float | None, float]:
    present = [value for value in values if value is not None]  # None: no gap to recover
    if not present:
        return None, 0.0
    return statistics.mean(present), (statistics.stdev(present) if len(present) > 1 else 0.0)


def aggregate(
    name: str,
    runs: list[dict[str, Any]],
    dense: dict[str, Any],
    pruned: dict[str, Any],
    tasks_above_chance: list[str] | None = None,
) -> dict[str, Any]:
    """One row of the results file from its runs (one per seed): means and spreads over seeds, the shares of the
    accuracy gap (over the row's tasks, and over those of them above chance) and of the log-perplexity gap."""
    tasks = list(runs[0]["tasks"])
    above = [task for task in tasks_above_chance or [] if task in tasks]
    avg_acc, avg_acc_std = _mean_spread([run["avg_acc"] for run in runs])
    ppl, ppl_std = _mean_spread([run["ppl"] for run in runs])
    if tasks == list(dense["tasks"]):
        recovered = [recovery.gap_recovered(dense["avg_acc"], pruned["avg_acc"], run["avg_acc"]) for run in runs]
    else:  # a row scored on some of the tasks: the gap over those
        recovered = [recovery.gap_recovered_on(tasks, dense["tasks"], pruned["tasks"], run["tasks"]) for run in runs]
    # Perplexity gap in log space: log-perplexity is the mean NLL, the quantity training lowers.
    recovered_ppl = [
        recovery.gap_recovered(-math.log(dense["ppl"]), -math.log(pruned["ppl"]), -math.log(run["ppl"])) for run in runs
    ]
    train_seconds_by_device = {
        device: statistics.mean(run["train_seconds"] for run in runs if run.get("device", "?") == device)
        for device in sorted({run.get("device", "?") for run in runs})
    }
    gap, gap_std = _mean_spread(recovered)
    # Item noise is shared by every seed (the same items), so averaging seeds does not shrink it.
    item_stderr, _ = _mean_spread([item_noise(dense, pruned, run) for run in runs])
    gap_ppl, gap_ppl_std = _mean_spread(recovered_ppl)
    gap_above, gap_above_std = _mean_spread(
        [recovery.gap_recovered_on(above, dense["tasks"], pruned["tasks"], run["tasks"]) for run in runs]
    )
    item_stderr_above, _ = _mean_spread([item_noise(dense, pruned, run, above) for run in runs])
    return {
        "method": name,
        "trainable_params": runs[0]["trainable_params"],
        "avg_acc": avg_acc,
        "avg_acc_std": avg_acc_std,
        "tasks": {task: statistics.mean(run["tasks"][task] for run in runs) for task in tasks},
        "ppl": ppl,
        "ppl_std": ppl_std,
        "gap_recovered": gap,
        "gap_recovered_std": gap_std,
        "gap_recovered_item_stderr": item_stderr,
        "gap_recovered_above_chance": gap_above,
        "gap_recovered_above_chance_std": gap_above_std,
        "gap_recovered_above_chance_item_stderr": item_stderr_above,
        "gap_recovered_ppl": gap_ppl,
        "gap_recovered_ppl_std": gap_ppl_std,
        "sparsity": pruned["sparsity"],
        "sparsity_after_merge": runs[0]["sparsity_after_merge"],
        "train_memory_mb": runs[0]["train_memory_mb"],
        "train_seconds": statistics.mean(run["train_seconds"] for run in runs),
        # A mean over a GPU and a CPU run says nothing: the time per device too.
        "train_seconds_by_device": train_seconds_by_device,
        "seeds": [run["seed"] for run in runs],
        "device": ",".join(train_seconds_by_device),
        "runs": runs,
    }


def paired_differences(rows: list[dict[str, Any]], against: str, tasks: list[str]) -> dict[str, dict[str, Any]]:
    """Over ``tasks``, each row's accuracy minus row ``against``'s on the same items, with the paired standard error
    (``recovery.paired_stderr``). Two trained rows are compared over every seed both ran and kept items for, each
    item's score averaged over those seeds; the dense and pruned rows, one measurement each, pair with every seed of
    the other row that kept items. A row scored on some of the tasks is compared over those of ``tasks``. Rows with no
    such seed or task are left out."""

    def runs_with_items(row: dict[str, Any]) -> dict[int | None, dict[str, Any]]:
        runs = row["runs"] if "runs" in row else [row | {"seed": None}]
        return {run["seed"]: run for run in runs if "items" in run}

    def mean_items(runs: list[dict[str, Any]], shared: list[str]) -> dict[str, Any]:
        decoded = [decoded_items(run, shared) for run in runs]
        return {task: sum(items[task].astype(float) for items in decoded) / len(decoded) for task in decoded[0]}

    def accuracy(items: dict[str, Any]) -> float:
        return statistics.mean(float(scores.mean()) for scores in items.values())

    reference = next((row for row in rows if row["method"] == against), None)
    if reference is None or not tasks:
        return {}
    reference_runs = runs_with_items(reference)
    differences = {}
    for row in rows:
        if row["method"] == against:
            continue
        row_runs = runs_with_items(row)
        if "runs" in row and "runs" in reference:
            seeds = sorted(set(row_runs) & set(reference_runs))
            runs, base = [row_runs[seed] for seed in seeds], [reference_runs[seed] for seed in seeds]
        else:  # one side is the dense or pruned measurement: every seed of the other side
            seeds = sorted(seed for seed in (row_runs if "runs" in row else reference_runs) if seed is not None)
            runs, base = list(row_runs.values()), list(reference_runs.values())
        shared = [task for task in tasks if task in row["tasks"] and task in reference["tasks"]]
        if not runs or not base or not shared:
            continue
        items, base_items = mean_items(runs, shared), mean_items(base, shared)
        differences[row["method"]] = {
            "seeds": seeds,
            "difference": accuracy(items) - accuracy(base_items),
            "stderr": recovery.paired_stderr(items, base_items),
        }
    return differences
