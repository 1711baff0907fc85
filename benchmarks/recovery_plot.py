"""The recovery benchmark's plot: each row's share of the gap against its trainable parameters (log scale)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

# Panels: (row key, axis label). The accuracy share over the tasks above chance is drawn when the file has them.
PANELS = (
    ("gap_recovered_above_chance", "share of the accuracy gap recovered\n(tasks the dense model is above chance on)"),
    ("gap_recovered_ppl", "share of the log-perplexity gap recovered"),
)


def plot(report: dict[str, Any], path: Path) -> None:
    """Write a PNG: one point per trained row, bars for the spread over seeds, faint wide bars for item noise."""
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib.pyplot as plt

    panels = [(key, label) for key, label in PANELS if any(row.get(key) is not None for row in report["rows"])]
    figure, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 5.5), squeeze=False)
    for axis, (key, label) in zip(axes[0], panels, strict=True):
        rows = [row for row in report["rows"] if row.get(key) is not None and row["trainable_params"] > 0]
        for row in rows:
            colour = "tab:red" if row["method"].startswith("restorelcc") else "tab:blue"
            x, y = row["trainable_params"], row[key]
            axis.errorbar(x, y, yerr=row.get(f"{key}_std") or 0, fmt="o", color=colour, capsize=3)
            item_noise = row.get(f"{key}_item_stderr")
            if item_noise:  # how far apart two points must be before the items can tell them apart
                axis.errorbar(x, y, yerr=item_noise, fmt="none", color=colour, alpha=0.3, capsize=5, linewidth=3)
            axis.annotate(row["method"], (x, y), xytext=(5, 3), textcoords="offset points", fontsize=7)
        axis.set_xscale("log")
        axis.axhline(0.0, color="grey", linewidth=1)
        axis.axhline(1.0, color="grey", linestyle=":", linewidth=1)
        axis.set_xlabel("trainable parameters (log)")
        axis.set_ylabel(label)
    settings = report["settings"]
    figure.suptitle(
        f"{settings['model']} {settings['method']} {settings.get('pattern') or settings['sparsity']}: "
        f"{settings['steps']} steps x batch {settings['batch_size']}, {settings['limit']} items per task\n"
        "red: RestoreLCC; bars: spread over seeds; faint wide bars: item noise (paired SE)"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
