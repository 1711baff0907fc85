"""The comparison's report: the summary over seeds, the Markdown table and the plot (``compare.md``, ``compare.png``)."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..evaluation import statistics as recovery


def summarise(runs: list[dict[str, Any]], methods: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per method, the mean over its seeds of every number, and the spread (sample SD) of the gap recovered."""
    summary = {}
    for method in methods:
        own = [run for run in runs if run["method"] == method]
        if not own:
            continue
        row: dict[str, Any] = {"seeds": [run["seed"] for run in own]}
        for key in ("mean_accuracy", "perplexity", "gap_recovered", "trainable_parameters", "trainable_percent",
                    "train_seconds", "peak_rss_gib", "sparsity_after_merge", "merged_speed_ratio", "train_steps",
                    "examples_seen", "unmerged_speed_ratio", "pruned_zeros_kept"):  # fmt: skip
            values = [run[key] for run in own if run.get(key) is not None]
            row[key] = sum(values) / len(values) if values else None
        row |= _merged_summary(own)
        row["unmerged_speed_untrained"] = any(run.get("unmerged_speed_source") for run in own)
        row["tasks"] = {task: sum(run["tasks"][task] for run in own) / len(own) for task in own[0]["tasks"]}
        shares = [run["gap_recovered"] for run in own if run.get("gap_recovered") is not None]
        mean = sum(shares) / len(shares) if shares else 0.0
        row["gap_recovered_spread"] = (
            math.sqrt(sum((share - mean) ** 2 for share in shares) / (len(shares) - 1)) if len(shares) > 1 else None
        )
        errors = [run["gap_recovered_stderr"] for run in own if run.get("gap_recovered_stderr") is not None]
        row["gap_recovered_stderr"] = sum(errors) / len(errors) if errors else None  # mean of the seeds' paired SEs
        summary[method] = row
    return summary


def _merged_summary(own: list[dict[str, Any]]) -> dict[str, Any]:
    """Over a method's seeds: whether every merged copy reloaded in stock transformers, and the largest logit
    difference of a reload (None where runs of an older schema did not measure it)."""
    reloads = [run["reloads_in_transformers"] for run in own if run.get("reloads_in_transformers") is not None]
    diffs = [run["reload_max_abs_diff"] for run in own if run.get("reload_max_abs_diff") is not None]
    return {"reloads_in_transformers": all(reloads) if reloads else None,
            "reload_max_abs_diff": max(diffs) if diffs else None}  # fmt: skip


def _cell(value: float | None, form: str) -> str:
    return "" if value is None else format(value, form)


def compare_table(report: dict[str, Any]) -> str:
    """Markdown: dense, pruned and each method (mean over seeds): accuracy per task, mean, gap recovered, perplexity,
    trainable parameters, train seconds, peak memory, sparsity after merge, the merged model's speed against the
    pruned one and whether stock transformers reloads it; then the failed runs, if any."""
    reference = report["reference"]
    tasks = list(reference["dense"]["tasks"])
    lines = [
        "| model | " + " | ".join(tasks) + " | mean | gap recovered | perplexity | trainable | train s | peak GiB"
        " | sparsity after merge | unmerged speed | merged speed | reloads |",
        "|---|" + "---|" * (len(tasks) + 10),
    ]
    for name in ("dense", "pruned"):
        row = reference[name]
        cells = [f"{row['tasks'][task]:.3f}" for task in tasks]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {row['mean_accuracy']:.3f} | | "
                     f"{_cell(row['perplexity'], '.2f')} | 0 | | | {row['sparsity']:.4f} | | | |")  # fmt: skip
    # Summarised afresh from the runs: a compare.json written by an earlier version renders as a new one does.
    for name, row in summarise(report["runs"], list(report["methods"])).items():
        cells = [f"{row['tasks'][task]:.3f}" for task in tasks]
        share = _cell(row["gap_recovered"], ".0%")
        if share and row["gap_recovered_spread"] is not None:
            share += f" ± {row['gap_recovered_spread']:.0%}"
        elif share and row.get("gap_recovered_stderr") is not None:  # one seed: the items' sampling error
            share += f" ± {row['gap_recovered_stderr']:.0%} SE"
        lines.append(
            f"| {name} | " + " | ".join(cells) + f" | {row['mean_accuracy']:.3f} | {share} | "
            f"{_cell(row['perplexity'], '.2f')} | {row['trainable_parameters']:,.0f} ({row['trainable_percent']:.2f}%)"
            f" | {_cell(row['train_seconds'], '.1f')} | {_cell(row['peak_rss_gib'], '.2f')} | "
            f"{_cell(row['sparsity_after_merge'], '.4f')} | {_unmerged_cell(row)} | {_merged_cells(row)} |"
        )
    lines.append("")
    lines.append(_gap_line(reference))
    lines.append("gap recovered: mean over seeds ± its spread between seeds (sample SD), or for one seed ± the paired"
                 " standard error (SE) of its items; peak GiB: resident, training;"
                 " unmerged speed: the trained model's forward speed unmerged (base plus adapter, as PEFT runs it)"
                 " / the pruned model's (-: not measured, a run of an earlier schema; *: timed on an untrained adapter"
                 " of the same shape when the run was resumed);"
                 " merged speed: the merged model's forward speed / the pruned model's (same batch and device);"
                 " reloads: stock AutoModelForCausalLM reloads the saved merged model with the same logits"
                 " (largest logit difference)")  # fmt: skip
    for failure in report.get("failed", []):
        error = failure["error"]
        lines.append(f"\nFAILED: {failure['method']} seed {failure['seed']}: {error['type']}: {error['message']}")
    return "\n".join(lines)


def _gap_line(reference: dict[str, Any]) -> str:
    """The dense-pruned gap the shares are of, with its paired standard error over the same items: a gap within two
    standard errors of zero makes every share noise."""
    dense, pruned = reference["dense"], reference["pruned"]
    gap = dense["mean_accuracy"] - pruned["mean_accuracy"]
    items = [{task: recovery.item_scores(scores) for task, scores in row["items"].items()} for row in (dense, pruned)]
    error = recovery.paired_stderr(*items)
    line = f"dense - pruned mean accuracy: {gap:+.3f}"
    if error is not None:
        line += f" (paired standard error {error:.3f} over the same items"
        line += "; within two standard errors of zero: the shares below are noise)" if abs(gap) < 2 * error else ")"
    return line + "."


def _unmerged_cell(row: dict[str, Any]) -> str:
    """The unmerged speed ratio; ``-`` for runs of an earlier schema that never measured it; ``*`` where a seed's
    figure was timed on an untrained adapter of the same shape (``UNTRAINED_SOURCE``)."""
    ratio = row.get("unmerged_speed_ratio")
    if ratio is None:
        return "-"
    return f"{ratio:.2f}x" + ("*" if row.get("unmerged_speed_untrained") else "")


def _merged_cells(row: dict[str, Any]) -> str:
    speed = _cell(row.get("merged_speed_ratio"), ".2f")
    reloads = row.get("reloads_in_transformers")
    reload_cell = "" if reloads is None else "yes" if reloads else "NO"
    if reloads is not None and row.get("reload_max_abs_diff") is not None:
        reload_cell += f" ({row['reload_max_abs_diff']:.1e})"
    return f"{speed + 'x' if speed else ''} | {reload_cell}"


def plot_compare(report: dict[str, Any], path: str | os.PathLike) -> Path | None:
    """Two panels: gap recovered per method (error bars: spread between seeds) and mean accuracy against trainable
    parameters. None where matplotlib is missing."""
    try:
        # Drawn on the Agg canvas directly: no pyplot, no GUI backend chosen, no environment variable set.
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    methods = report["methods"]
    figure = Figure(figsize=(10, 4))
    FigureCanvasAgg(figure)
    left, right = figure.subplots(1, 2)
    names = list(methods)
    shares = [methods[name]["gap_recovered"] or 0.0 for name in names]
    # The spread between seeds, or with one seed the paired standard error of its items (as the table).
    errors = [methods[name]["gap_recovered_spread"] or methods[name].get("gap_recovered_stderr") or 0.0 for name in names]
    left.bar(names, shares, yerr=errors, capsize=4)
    left.axhline(0.0, color="grey", linewidth=1)
    left.set_ylabel("share of the dense-pruned gap recovered")
    for name in names:
        right.scatter(max(methods[name]["trainable_parameters"], 1), methods[name]["mean_accuracy"], label=name)
    for name, color in (("dense", "black"), ("pruned", "grey")):
        right.axhline(report["reference"][name]["mean_accuracy"], color=color, linestyle="--", linewidth=1, label=name)
    right.set_xscale("log")
    right.set_xlabel("trainable parameters")
    right.set_ylabel("mean accuracy")
    right.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return Path(path)
