"""Every results file of benchmarks/results/ as markdown, so that no number in the docs is typed by hand.

    python benchmarks/report.py > docs/benchmarks.md     # every file's table (a test checks the committed copy)
    python benchmarks/report.py --brief                  # the README's one table: dense / pruned / the methods

Each section is headed by the file's path and the commands the file records (or says that it records none). The
recovery files get their table of rows; pruning.json its table; any other file (overhead.json, calibration.json, a
future one) is rendered from its structure: values as key/value tables, lists of records as tables.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# What a recovery results file measured, as its section shows it; two files that agree on these hold comparable rows
# (recovery_results.measured_alike). Kept here so that this script imports no model code: it runs in a second.
MEASUREMENT_SETTINGS = ("model", "method", "sparsity", "pattern", "steps", "batch_size", "limit",
                        "perplexity_passages", "prune_samples", "calibration_samples", "pairs")  # fmt: skip
RESULTS = ROOT / "benchmarks" / "results"

# The README's brief table: the file with RestoreLCC, LoRA and every weight on one pruned model and one budget (the
# H200 ran the paper's 750 steps; the CPU's 750-step file has no LoRA row), and its rows with their labels.
BRIEF_FILE = RESULTS / "recovery-750-steps" / "recovery.json"
BRIEF_ROWS = {
    "dense": ("dense", ""),
    "pruned": ("pruned", ""),
    "restorelcc-instruction": ("RestoreLCC, 25% of the heads", "the paper's recipe"),
    "lora-instruction": ("LoRA r=8, every linear layer", "the paper's recipe"),
    "restorelcc-instruction-and-cloze-in-task": ("RestoreLCC, 25% of the heads", "the recipe's and the tasks' own pairs"),
    "sparse-ft-instruction-and-cloze-in-task": ("every weight, pruned ones held at zero", "the recipe's and the tasks' own pairs"),
}  # fmt: skip


def _spread(value: float | None, std: float | None, fmt: str) -> str:
    return (fmt.format(value) + (f" ± {fmt.format(std)}" if std else "")) if value is not None else ""


def markdown_table(report: dict[str, Any]) -> str:
    """A recovery results file's rows: per-task accuracy, average, shares of the accuracy gap (every task, and the
    tasks above chance) with their item noise, perplexity and its share, sparsity after merge, costs, seeds; then
    the paired differences (``--paired-with``) and which tasks are above chance."""
    rows = report["rows"]
    tasks = list(rows[0]["tasks"])
    lines = [
        "| method | trainable params | " + " | ".join(tasks) + " | avg acc | gap recovered (acc) | item noise (acc) | "
        "gap recovered (acc, tasks above chance) | ppl | gap recovered (log ppl) | sparsity after merge | train s | "
        "train memory MB | seeds | ran on |",
        "|---|" + "---|" * (len(tasks) + 12),
    ]

    def item_noise_cell(row: dict[str, Any], key: str = "gap_recovered_item_stderr") -> str:
        noise = row.get(key)
        return "" if noise is None else f"±{noise:.0%}"

    def above_chance_cell(row: dict[str, Any]) -> str:
        share = _spread(row.get("gap_recovered_above_chance"), row.get("gap_recovered_above_chance_std"), "{:.0%}")
        noise = item_noise_cell(row, "gap_recovered_above_chance_item_stderr")
        return share + (f" (items {noise})" if share and noise else "")

    def train_time(row: dict[str, Any]) -> str:
        by_device = row.get("train_seconds_by_device") or {}
        if len(by_device) > 1:
            return " / ".join(f"{seconds:.0f} {device}" for device, seconds in by_device.items())
        return f"{row.get('train_seconds', 0):.0f}"

    for row in rows:
        lines.append(
            f"| {row['method']} | {row['trainable_params']:,} | "
            + " | ".join(f"{row['tasks'][task]:.3f}" if task in row["tasks"] else "" for task in tasks)
            + f" | {_spread(row['avg_acc'], row.get('avg_acc_std'), '{:.3f}')}"
            + f" | {_spread(row.get('gap_recovered'), row.get('gap_recovered_std'), '{:.0%}')} | {item_noise_cell(row)}"
            + f" | {above_chance_cell(row)}"
            + f" | {_spread(row['ppl'], row.get('ppl_std'), '{:.2f}')}"
            + f" | {_spread(row.get('gap_recovered_ppl'), row.get('gap_recovered_ppl_std'), '{:.0%}')}"
            + f" | {_spread(row['sparsity_after_merge'], 0, '{:.4f}')} | {train_time(row)}"
            + f" | {_spread(row.get('train_memory_mb'), 0, '{:.0f}')} | "
            + ",".join(map(str, row.get("seeds", [])))
            + f" | {row.get('device', '')} |"
        )
    if report.get("paired_with"):
        paired = report["paired_with"]

        def seed_of(pair: dict[str, Any]) -> str:
            seeds = pair["seeds"]
            return "" if not seeds else f" (seed{'s' if len(seeds) > 1 else ''} {','.join(map(str, seeds))})"

        def stderr_of(pair: dict[str, Any]) -> str:
            return "" if pair["stderr"] is None else f" ± {pair['stderr']:.4f}"

        lines.append(
            f"\nOn the same items, over the tasks above chance, accuracy minus {paired['method']}'s (± the paired"
            " standard error): "
            + (
                "; ".join(
                    f"{method}{seed_of(pair)} {pair['difference']:+.4f}{stderr_of(pair)}"
                    for method, pair in paired["differences"].items()
                )
                or "none (no task above chance, or no other row kept its items on a seed this one ran)"
            )
            + "."
        )
    if "above_chance" in report:
        chance = report["above_chance"]
        lines.append(
            f"\nTasks above chance (the dense model beats a question-blind answer by more than {chance['z']} standard"
            f" errors): {', '.join(chance['tasks']) or 'none'}. Chance: "
            + ", ".join(f"{task} {value:.3f}" for task, value in chance["chance"].items())
            + "."
        )
    return "\n".join(lines)


def recipe_table(report: dict[str, Any]) -> str:
    """How each trained row of a recovery file was trained, as its runs record it: data, loss, learning rate."""

    def recipe(run: dict[str, Any]) -> tuple[str, str, str]:
        if "learning_rate" not in run:  # written before runs recorded their recipe: the file's settings say it
            return str(report["settings"].get("data")), "as the file's settings say (not recorded per run)", ""
        if run["learning_rate"] is None:
            return "", "not trained", ""
        alpha = run.get("distill_alpha")
        loss = {None: "LM loss", 0: "LM loss", 1: "KL to the dense model"}.get(alpha, f"LM loss and KL to the dense model, KL weight {alpha}")
        return str(run.get("data")), loss, f"{run['learning_rate']:g}"

    lines = ["| method | data | loss | learning rate |", "|---|---|---|---|"]
    for row in report["rows"]:
        for data, loss, rate in dict.fromkeys(recipe(run) for run in row.get("runs", [])):
            lines.append(f"| {row['method']} | {data} | {loss} | {rate} |")
    return "\n".join(lines)


def pruning_table(report: dict[str, Any]) -> str:
    """benchmarks/pruning.py's rows: per-task accuracy, average, perplexity, sparsity, pruning time."""
    rows = report["rows"]
    tasks = list(rows[0]["tasks"])
    lines = [
        "| model | " + " | ".join(tasks) + " | avg | perplexity | sparsity | pruning s |",
        "|---|" + "---|" * (len(tasks) + 4),
    ]
    for row in rows:
        lines.append(
            f"| {row['model']} | "
            + " | ".join(f"{row['tasks'][t]:.3f}" for t in tasks)
            + f" | {row['avg_acc']:.3f} | {row['ppl']:.2f} | "
            + ("" if row["sparsity"] is None else f"{row['sparsity']:.3f}")
            + " | "
            + ("" if row["prune_seconds"] is None else f"{row['prune_seconds']:.0f}")
            + " |"
        )
    return "\n".join(lines)


def quantized_recovery_table(report: dict[str, Any]) -> str:
    """benchmarks/quantized_recovery.py's rows: per format, the pruned model and each method merged into it; accuracy,
    the zeros after merge (weights dequantized), the quantized tensors the merge changed, size on disk, and the largest
    logit difference from the unmerged model. Two merges per method: into the checkpoint freshly quantized (what
    ``restorelcc merge --quantization`` saves; reloaded from disk) / in memory after a forward (4-bit repacked on the
    CPU)."""
    rows = report["rows"]
    tasks = list(rows[0]["tasks"])
    lines = [
        "| format | model | " + " | ".join(tasks) + " | avg acc | ppl | sparsity after merge | pruned zeros kept |"
        " quantized tensors changed by merge (fresh / after a forward) | size on disk MiB |"
        " max logit diff merged vs unmerged (fresh / after a forward) | trainable params |",
        "|---|---|" + "---|" * (len(tasks) + 8),
    ]

    def number(value: Any, form: str) -> str:
        return "" if value is None else value if isinstance(value, str) else form.format(value)

    for row in rows:
        changed, total = row.get("quantized_tensors_changed_by_merge"), row.get("quantized_tensors")
        changed_cell = "" if changed is None else (
            f"{changed} / {number(row.get('quantized_tensors_changed_by_merge_after_forward'), '{}')} of {total}"
        )
        if changed is not None and row.get("quantized_tensors_changed_on_disk") != changed:
            changed_cell += f" ({row['quantized_tensors_changed_on_disk']} on disk)"
        difference = row.get("max_logit_diff_reloaded_vs_unmerged")
        difference_cell = "" if difference is None else (
            f"{difference:.3g} / {number(row.get('max_logit_diff_merged_after_forward_vs_unmerged'), '{:.3g}')}"
            f" (of {row['max_abs_logit_unmerged']:.1f})"
        )
        lines.append(
            f"| {row['format']} | {row['model']} | "
            + " | ".join(number(row["tasks"].get(task), "{:.3f}") for task in tasks)
            + f" | {row['avg_acc']:.3f} | {number(row.get('perplexity'), '{:.2f}')}"
            + f" | {row['sparsity']:.6f} | {number(row.get('pruned_zeros_kept'), '{:.6f}')} | {changed_cell}"
            + f" | {row['size_mib']:.1f} | {difference_cell} | {number(row.get('trainable_parameters'), '{:,}')} |"
        )
    return "\n".join(lines)

def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list) and all(not isinstance(item, (dict, list)) for item in value):
        return ", ".join(map(str, value))
    return "" if value is None else str(value).replace("|", "\\|").replace("\n", " ")


def _is_nested(value: Any) -> bool:
    return isinstance(value, dict) or (isinstance(value, list) and any(isinstance(item, (dict, list)) for item in value))


def structure(data: Any, level: int = 3) -> list[str]:
    """Any JSON value as markdown: a mapping's plain values as one key/value table, each nested value under its own
    bold heading; a list of flat records as one table; a list of nested records one block each."""
    if isinstance(data, list):
        if all(isinstance(item, dict) and not any(map(_is_nested, item.values())) for item in data):
            columns = list(dict.fromkeys(key for item in data for key in item))
            return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)] + [
                "| " + " | ".join(_cell(item.get(column)) for column in columns) + " |" for item in data
            ]
        lines: list[str] = []
        for index, item in enumerate(data, 1):
            lines += [f"{'#' * level} {index}", "", *structure(item, level + 1), ""]
        return lines
    if not isinstance(data, dict):
        return [_cell(data)]
    plain = {key: value for key, value in data.items() if not _is_nested(value)}
    lines = ["| key | value |", "|---|---|", *(f"| {key} | {_cell(value)} |" for key, value in plain.items())] if plain else []
    for key, value in data.items():
        if _is_nested(value):
            lines += ["", f"**{key}**", "", *structure(value, level)]
    return lines


LEGACY_COMMIT = "df172c2"


def _commands(commands: list[str]) -> list[str]:
    if not commands:
        # Files written before the runner recorded its commands: the README of that time gave them beside the tables.
        return [f"The file records no command; the commands that made it are in the README of commit {LEGACY_COMMIT} "
                f"(`git show {LEGACY_COMMIT}:README.md`), beside its table, in the flags of the runner of that time."]
    return ["```bash", *commands, "```"]


def _settings_line(settings: dict[str, Any], keys: tuple[str, ...] | None = None) -> str:
    shown = {key: settings.get(key) for key in keys} if keys else settings
    return "Its settings: " + ", ".join(f"{key} `{value}`" for key, value in shown.items()) + "."


def recovery_section(report: dict[str, Any]) -> list[str]:
    lines = _commands(report.get("commands", []))
    if not report.get("commands"):
        shards = len(report["settings"].get("resume_from") or [])
        lines.append(_settings_line(report["settings"], MEASUREMENT_SETTINGS) + f" Runs merged from {shards} shard{'s' * (shards != 1)}.")
    return lines + ["", markdown_table(report), "", "How each row trained:", "", recipe_table(report)]


def section(path: Path, data: Any) -> str:
    """One results file as a markdown section, headed by its path."""
    if isinstance(data, dict) and {"rows", "settings", "above_chance"} <= set(data):
        body = recovery_section(data)
        plot = path.with_name("recovery.png")  # drawn by the benchmark before its rows became a table
        if plot.exists() and plot.resolve().is_relative_to(ROOT):
            body += ["", f"![{plot.parent.name}](../{plot.resolve().relative_to(ROOT)})"]
    elif isinstance(data, dict) and path.name == "compare.json":
        from peft_restorelcc.compare.table import compare_table

        body = [*_commands([compare_command(data["settings"])]), "", compare_table(data)]
        plot = path.with_name("compare.png")
        if plot.exists() and plot.resolve().is_relative_to(ROOT):
            body += ["", f"![{plot.parent.name}](../{plot.resolve().relative_to(ROOT)})"]
    elif isinstance(data, dict) and "rows" in data and all({"format", "model", "tasks"} <= set(row) for row in data["rows"]):
        body = [*_commands([data["command"]]), _settings_line(data["settings"]), "", quantized_recovery_table(data)]
        plot = path.with_suffix(".png")
        if plot.exists() and plot.resolve().is_relative_to(ROOT):
            body += ["", f"![{plot.stem}](../{plot.resolve().relative_to(ROOT)})"]
    elif isinstance(data, dict) and "rows" in data and all({"model", "tasks"} <= set(row) for row in data["rows"]):
        body = [*_commands(data.get("commands", [])), _settings_line(data.get("settings", {})), "", pruning_table(data)]
    else:
        body = [*_commands([data["command"]] if isinstance(data, dict) and "command" in data else []), "",
                *structure(data)]  # fmt: skip
    try:
        name = path.resolve().relative_to(ROOT)
    except ValueError:
        name = path
    return "\n".join([f"## `{name}`", "", *body]).rstrip() + "\n"


def results_files(results: Path = RESULTS) -> list[Path]:
    return (sorted(results.glob("*.json")) + sorted(results.glob("*/recovery.json"))
            + sorted(results.glob("*/results.json")) + sorted(results.glob("*/compare.json")))  # fmt: skip


def table_rows(path: Path = ROOT / "benchmarks" / "recovery_methods.yaml") -> str:
    """The rows benchmarks/recovery.py runs now, from its table (which it checks; here only shown)."""
    import yaml

    table = yaml.safe_load(path.read_text())
    lines = ["| row | kind | data | distill_alpha | learning rate | what it is |", "|---|---|---|---|---|---|"]
    for name, own in table["rows"].items():
        row = table.get("defaults", {}) | own
        lines.append(f"| {name} | {row['kind']} | {row['data']} | {row['distill_alpha']} | {row['learning_rate']:g} |"
                     f" {row['about']} |")  # fmt: skip
    return "\n".join([f"## The rows `benchmarks/recovery.py` runs now (`{path.relative_to(ROOT)}`)", "", *lines, ""])


def render(results: Path = RESULTS) -> str:
    header = [
        "# Benchmark results",
        "",
        "Generated from the results files by `python benchmarks/report.py > docs/benchmarks.md`: do not edit by hand.",
        "Rows, columns and the commands are those the files record. In the recovery tables the share of the gap is",
        "(restored - pruned) / (dense - pruned) of the average accuracy, ± the spread over seeds; the item noise is",
        "the paired standard error of that share over the items scored. Files may hold rows since retired from the",
        "benchmark's table; each file's last table says how its rows trained.",
        "",
    ]
    return "\n".join(header) + "\n" + table_rows() + "\n" + "\n".join(section(path, json.loads(path.read_text())) for path in results_files(results))


def brief(path: Path = BRIEF_FILE, rows: dict[str, tuple[str, str]] = BRIEF_ROWS) -> str:
    """The README's one table, from one recovery results file: the rows of ``rows`` with their labels."""
    report = json.loads(path.read_text())
    by_name = {row["method"]: row for row in report["rows"]}
    settings, above = report["settings"], report["above_chance"]["tasks"]
    devices = sorted({run.get("device", "?") for name in rows for run in by_name[name].get("runs", [])})
    pruning = settings.get("pattern") or f"{settings['sparsity']:.0%}"
    lines = [
        f"From `{path.resolve().relative_to(ROOT)}`: {settings['model']} pruned by {settings['method']}"
        f" {pruning}, {settings['steps']} steps of batch {settings['batch_size']} on {', '.join(devices)}, the first"
        f" {settings['limit']} items of each task. Share of the gap over the {len(above)} tasks the dense model is"
        f" above chance on ({', '.join(above)}), ± the spread over seeds; perplexity on held-out LAMBADA.",
        "",
        "| model | trained on | trainable params | sparsity after merge | share of the gap | held-out perplexity |",
        "|---|---|---|---|---|---|",
    ]
    for name, (label, data) in rows.items():
        row = by_name[name]
        seeds = row.get("seeds", [])
        share = _spread(row.get("gap_recovered_above_chance"), row.get("gap_recovered_above_chance_std"), "{:.0%}")
        share += f" ({len(seeds)} seed{'s' * (len(seeds) > 1)})" if seeds else ""
        lines.append(
            f"| {label} | {data} | {row['trainable_params']:,} | {row['sparsity_after_merge']:.4f} | {share} |"
            f" {_spread(row['ppl'], row.get('ppl_std'), '{:.1f}')} |"
        )
    return "\n".join(lines)


COMPARE_FILE = RESULTS / "compare-smollm2" / "compare.json"


def compare_command(settings: dict[str, Any]) -> str:
    """The `restorelcc compare` command line that gives ``settings``: the flags whose values differ from the
    defaults (a run's compare.json records its settings, not its command line)."""
    from dataclasses import asdict

    from peft_restorelcc.compare.settings import CompareSettings

    defaults = json.loads(json.dumps(asdict(CompareSettings())))
    flags = {"train_steps": "--steps", "model": "--model"}
    parts = ["restorelcc compare"]
    for key, value in settings.items():
        if key in defaults and value != defaults[key] and value is not None:
            text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
            parts.append(f"{flags.get(key, '--' + key.replace('_', '-'))} {text}")
    return " ".join(parts)


def compare_brief(path: Path = COMPARE_FILE) -> str:
    """The README's comparison table: ``compare.md``'s table regenerated from ``compare.json``, with its command."""
    from peft_restorelcc.compare.table import compare_table

    report = json.loads(path.read_text())
    return (
        f"From `{path.resolve().relative_to(ROOT)}`, made by `{compare_command(report['settings'])}` on"
        f" {report['settings'].get('model')}:\n\n" + compare_table(report)
    )


DECIDING_COMPARE_FILE = RESULTS / "compare-gemma3-270m" / "compare.json"
METHOD_LABELS = {"restorelcc": "RestoreLCC", "lora": "LoRA", "masked-lora": "masked LoRA", "dora": "DoRA", "ia3": "IA3"}


def compare_finding(path: Path = DECIDING_COMPARE_FILE, first: str = "masked-lora", second: str = "restorelcc") -> str:
    """The README's sentence on a comparison: the dense-pruned gap with its paired standard error, each method's
    share of it (± its paired SE), perplexity, sparsity after merge and unmerged speed, and the paired difference of
    ``first`` and ``second`` in mean accuracy over the same items, read against two standard errors."""
    from peft_restorelcc.evaluation.statistics import item_scores, paired_stderr

    report = json.loads(path.read_text())
    settings, methods, reference = report["settings"], report["methods"], report["reference"]

    def items(row: dict[str, Any]) -> dict[str, Any]:
        return {task: item_scores(scores) for task, scores in row["items"].items()}

    dense, pruned = reference["dense"], reference["pruned"]
    gap = dense["mean_accuracy"] - pruned["mean_accuracy"]
    seed = settings["seeds"][0]
    runs = {run["method"]: run for run in report["runs"] if run["seed"] == seed}
    parts = []
    for name in settings["methods"]:
        row = methods[name]
        stderr = row.get("gap_recovered_stderr", runs[name].get("gap_recovered_stderr"))
        speed = row.get("unmerged_speed_ratio")
        speed_text = "" if speed is None else f", unmerged speed {speed:.2f}x" + ("*" if row.get("unmerged_speed_untrained") else "")
        parts.append(
            f"{METHOD_LABELS.get(name, name)} {row['gap_recovered']:.0%} ± {stderr:.0%} (perplexity"
            f" {row['perplexity']:.1f}, sparsity after merge {row['sparsity_after_merge']:.4f}{speed_text})"
        )
    sentence = (
        f"On {settings['model']} (`{compare_command(settings)}`, {len(dense['tasks'])} tasks x {settings['limit']}"
        f" items, seed {seed}) the dense - pruned gap is {gap:+.3f} ± {paired_stderr(items(dense), items(pruned)):.3f}"
        f" (paired standard error; pruned perplexity {pruned['perplexity']:.1f}); recovered: " + "; ".join(parts) + "."
    )
    if first in runs and second in runs:
        difference = runs[first]["mean_accuracy"] - runs[second]["mean_accuracy"]
        error = paired_stderr(items(runs[first]), items(runs[second]))
        verdict = (
            "within two standard errors of zero: at this budget the items do not separate them"
            if abs(difference) < 2 * error
            else f"{METHOD_LABELS[first if difference > 0 else second]} is ahead by more than two standard errors"
        )
        sentence += (
            f" {METHOD_LABELS[first][:1].upper()}{METHOD_LABELS[first][1:]} - {METHOD_LABELS[second]} in mean accuracy:"
            f" {difference:+.3f} ± {error:.3f}"
            f" (paired over the same items), {verdict}."
        )
    if any(row.get("unmerged_speed_untrained") for row in methods.values()):
        sentence += " (*: timed on an untrained adapter of the same shape: the run was kept from an earlier schema.)"
    return sentence


MAIN_JOB_FILE = RESULTS / "main-job.json"


def main_job(path: Path = MAIN_JOB_FILE) -> str:
    """The README's sentence on what the main job costs: its stage counts, and the range of its measured runs."""
    data = json.loads(path.read_text())
    runs = data["runs"]
    minutes = sorted(run["wall_s"] / 60 for run in runs)
    memory = sorted(run["peak_rss_gib"] for run in runs)
    cores = "/".join(str(count) for count in sorted({run["cores"] for run in runs}))
    cpus = ", ".join(sorted({run["cpu"] for run in runs}))
    stages = data["stages"]
    sentence = (
        f"The job is {stages['training']}, {stages['evaluation']}. Timed with `{data['command']}`, it took"
        f" {minutes[0]:.0f} to {minutes[-1]:.0f} min and {memory[0]:.1f} to {memory[-1]:.1f} GiB at peak on {cores}-core"
        f" CPU machines ({len(runs)} runs; CPU: {cpus}; each run in `{path.resolve().relative_to(ROOT)}`)."
    )
    for run in data.get("other_models", []):
        sentence += (
            f" With `{run['command']}` ({run['model']}) the same job took {run['wall_s'] / 60:.0f} min and"
            f" {run['peak_rss_gib']:.1f} GiB at peak ({run['threads']} thread{'s' if run['threads'] > 1 else ''},"
            f" CPU: {run['cpu']})."
        )
    return sentence


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--brief", action="store_true", help="only the README's table, from " + str(BRIEF_FILE.relative_to(ROOT)))
    parser.add_argument("--main-job", action="store_true", help="only the README's sentence on the main job's cost")
    parser.add_argument("--compare", action="store_true", help="only the README's comparison table, from "
                        + str(COMPARE_FILE.relative_to(ROOT)))  # fmt: skip
    parser.add_argument("--compare-finding", action="store_true", help="only the README's sentence on the deciding"
                        " comparison, from " + str(DECIDING_COMPARE_FILE.relative_to(ROOT)))  # fmt: skip
    parser.add_argument("--results", type=Path, default=RESULTS, help="the folder of results files")
    args = parser.parse_args()
    if args.compare_finding:
        print(compare_finding())
        return
    if args.main_job:
        print(main_job())
        return
    if args.compare:
        print(compare_brief())
        return
    print(brief() if args.brief else render(args.results), end="\n" if args.brief else "")


if __name__ == "__main__":
    main()
