"""How much of the pruning gap each method gives back, every row on the same pruned model, steps, batch and items.

The rows are data: benchmarks/recovery_methods.yaml names each one's method kind (RestoreLCC, LoRA, IA3, every
weight) and recipe (data, distillation weight, learning rate, heads ...). This runner prunes the model once (SmolLM2-135M,
Wanda 50% by default), calibrates once, and runs every row through ``restorelcc compare``'s own code path: the row
becomes a ``compare.MethodSpec`` and ``compare.run_method`` builds it, trains it, scores it on the paper's seven tasks
(the first ``--limit`` items of each) and held-out LAMBADA perplexity, and merges it (on a copy) to measure the
sparsity that survives. What the benchmark adds plugs into that path: its own training sets and a disk cache of the
lost components (``Context``, a ``compare.Models``), shards, resuming, paired differences and the report.

    python benchmarks/recovery.py --steps 10 --limit 20 --seeds 0 --methods restorelcc-instruction,lora-instruction

Writes OUTPUT/recovery.json (rows: dense, pruned, then one per table row, seeds aggregated) and recovery.md, after
every finished run: an interrupted benchmark keeps what it measured, and a rerun with the same measurement settings
keeps those runs. Shards run elsewhere (each with its own ``--output``) are merged with ``--resume-from
SHARD/recovery.json``; with ``--merge-only`` a merge loads no model. ``python benchmarks/report.py`` renders every
results file (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets
import torch
import yaml
from recovery_plot import plot
from recovery_results import (
    above_chance,
    aggregate,
    check_same_models,
    finished_runs,
    json_settings,
    measured_alike,
    own_seconds,
    paired_differences,
    recipe_of,
    runs_on_other_weights,
    shard_times,
)
from report import markdown_table
from tqdm import tqdm

from peft_restorelcc import pipeline
from peft_restorelcc.calibration import LostComponents
from peft_restorelcc.calibration.adapter import INITS
from peft_restorelcc.compare import runs as compare
from peft_restorelcc.data import in_task_examples, instruction_examples, shuffled
from peft_restorelcc.data.choices import EVALUATED_ITEMS
from peft_restorelcc.evaluation import statistics as recovery
from peft_restorelcc.evaluation.choices import PAPER_BUNDLED, PAPER_TASKS
from peft_restorelcc.evaluation.tasks import resolve_tasks
from peft_restorelcc.io import load_model, load_tokenizer
from peft_restorelcc.io.devices import default_device
from peft_restorelcc.pruning import load_report, measure_sparsity, save_pruned
from peft_restorelcc.pruning.choices import resolve_sparsity
from peft_restorelcc.training.choices import parse_batch_size
from peft_restorelcc.training.trainer import check_data_choice, instruction_records

RESULTS = Path(__file__).parent / "results"
TABLE = Path(__file__).parent / "recovery_methods.yaml"


# ---- the table ---------------------------------------------------------------------------------------------------

FLOAT = (int, float)
# Every key a row may have, with its type; a kind's own keys apart.
ROW_KEYS: dict[str, Any] = {"kind": str, "about": str, "data": str, "distill_alpha": FLOAT, "learning_rate": FLOAT,
                            "calibration": str, "tasks": (list, type(None))}  # fmt: skip
# The kinds are compare.BUILDERS'.
KIND_KEYS: dict[str, dict[str, Any]] = {
    "restorelcc": {"heads": FLOAT, "selection": str, "init": str},
    "lora": {"rank": int, "target_modules": (str, list)},
    "dora": {"rank": int, "target_modules": (str, list)},
    "masked-lora": {"rank": int, "target_modules": (str, list)},
    "ia3": {},
    "every-weight": {},
}
CALIBRATIONS = compare.CALIBRATIONS
CHOICES = {"selection": ("top", "per-layer"), "init": INITS}


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML that refuses a key given twice in one mapping (PyYAML keeps the last one silently): two rows of one name."""


def _unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    keys = [loader.construct_object(key, deep=True) for key, _ in node.value]
    repeated = sorted({str(key) for key in keys if keys.count(key) > 1})
    if repeated:
        raise ValueError(f"line {node.start_mark.line + 1}: {', '.join(repeated)} given twice; give each name once")
    return loader.construct_mapping(node, deep=True)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def load_table(path: Path = TABLE) -> dict[str, dict[str, Any]]:
    """The table's rows, each with its defaults filled in, checked (``check_table``); ValueError naming the file."""
    try:
        return check_table(yaml.load(Path(path).read_text(), Loader=_UniqueKeyLoader))
    except (ValueError, yaml.YAMLError) as error:
        raise ValueError(f"{path}: {error}") from None


def _check_value(where: str, key: str, value: Any, kind: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, kind):
        names = " or ".join(t.__name__ for t in (kind if isinstance(kind, tuple) else (kind,)))
        hint = " (YAML reads 1e-3 as text: write 1.0e-3)" if isinstance(value, str) and kind is FLOAT else ""
        raise ValueError(f"{where}: {key} must be {names}, got {value!r}{hint}")
    if key in CHOICES and value not in CHOICES[key]:
        raise ValueError(f"{where}: {key} must be one of {list(CHOICES[key])}, got {value!r}")


def check_table(table: Any) -> dict[str, dict[str, Any]]:
    """Every row resolved (``defaults``, then its kind's defaults, then its own keys) and checked: known keys of the
    right type, a known method kind, data, calibration and tasks, rates in range. ValueError naming row and key."""
    if not isinstance(table, dict) or not isinstance(table.get("rows"), dict) or not table["rows"]:
        raise ValueError("the table needs a `rows:` mapping of row names to their settings")
    unknown = set(table) - {"defaults", "kinds", "rows"}
    if unknown:
        raise ValueError(f"unknown top-level keys {sorted(unknown)}; the table has defaults, kinds and rows")
    defaults, kind_defaults = table.get("defaults") or {}, table.get("kinds") or {}
    for kind, values in kind_defaults.items():
        if kind not in KIND_KEYS or set(values or {}) - set(KIND_KEYS[kind]):
            raise ValueError(f"kinds: {kind!r} with {sorted(values or {})}; kinds are {sorted(KIND_KEYS)}, each with its keys")
    rows = {}
    for name, own in table["rows"].items():
        where = f"row {name!r}"
        if not isinstance(own, dict) or own.get("kind") not in KIND_KEYS:
            raise ValueError(f"{where}: kind must be one of {sorted(KIND_KEYS)}, got {(own or {}).get('kind')!r}")
        known = ROW_KEYS | KIND_KEYS[own["kind"]]
        row = defaults | (kind_defaults.get(own["kind"]) or {}) | own
        for key in row:
            if key not in known:
                raise ValueError(f"{where}: unknown key {key!r} for kind {own['kind']}; known: {sorted(known)}")
            _check_value(where, key, row[key], known[key])
        missing = sorted(set(known) - set(row))
        if missing:
            raise ValueError(f"{where}: missing {', '.join(missing)} (give them in the row, defaults or kinds)")
        if not 0 <= row["distill_alpha"] <= 1 or row["learning_rate"] <= 0:
            raise ValueError(f"{where}: distill_alpha must be in [0, 1] and learning_rate > 0")
        if row["calibration"] not in CALIBRATIONS:
            raise ValueError(f"{where}: calibration must be one of {sorted(CALIBRATIONS)}, got {row['calibration']!r}")
        try:
            if row["data"] not in BENCHMARK_DATA:
                check_data_choice(row["data"])
        except ValueError as error:
            raise ValueError(f"{where}: {error} The benchmark's own sets: {sorted(BENCHMARK_DATA)}.") from None
        try:
            if row["tasks"] is not None:
                # The bundled tasks only: the benchmark's chance levels and item counts are theirs (lm-eval's registry
                # tasks are for `restorelcc run/compare/eval --tasks`).
                other = [str(task) for task in row["tasks"] if str(task) not in (*PAPER_TASKS, PAPER_BUNDLED)]
                if other:
                    raise ValueError(f"unknown task(s) {', '.join(other)}; the benchmark measures the bundled tasks: "
                                     f"{', '.join(PAPER_TASKS)}")  # fmt: skip
                row["tasks"] = resolve_tasks([str(task) for task in row["tasks"]])
        except ValueError as error:
            raise ValueError(f"{where}: tasks: {error}") from None
        rows[str(name)] = row
    return rows


# ---- what a row is built from ------------------------------------------------------------------------------------


def _instruction_and_cloze_in_task(samples: int, seed: int) -> list[dict]:
    """The recipe's pairs and the evaluation tasks' own items after the first EVALUATED_ITEMS, in the form lm-eval
    scores them (data.in_task_examples), shuffled together."""
    cloze = in_task_examples("train", seed=seed, form="cloze")
    return shuffled(instruction_examples("train", seed=seed) + cloze, seed, samples)


# The benchmark's own training sets beside the library's (training.DATA_CHOICES), as {"prompt", "response"} pairs.
BENCHMARK_DATA: dict[str, Callable[[int, int], list[dict]]] = {
    "instruction-and-cloze-in-task": _instruction_and_cloze_in_task
}
# Sets drawn from the evaluation tasks' items: only with --limit <= data.EVALUATED_ITEMS, or they would be scored.
ON_EVALUATION_ITEMS = {"instruction-and-cloze-in-task"}
# HellaSwag's four endings make long prompts (up to 266 tokens with the answer and EOS, docs/data.md): 320 cuts none.
BENCHMARK_DATA_SEQ_LEN = 320


def training_dataset(data: str, tokenizer: Any, samples: int, seed: int, seq_len: int = 128) -> datasets.Dataset:
    """The benchmark's own sets (BENCHMARK_DATA), else the library's (``pipeline.training_data``, as compare)."""
    if data in BENCHMARK_DATA:
        examples = BENCHMARK_DATA[data](samples, seed)
        return datasets.Dataset.from_list(instruction_records(examples, tokenizer, BENCHMARK_DATA_SEQ_LEN))
    return pipeline.training_data(data, tokenizer, samples=samples, seed=seed, seq_len=seq_len)


def compare_settings(args: argparse.Namespace) -> compare.CompareSettings:
    """The benchmark's flags as ``restorelcc compare``'s settings: what ``compare.run_method`` trains and measures by.
    The rows' own recipes (rate, data, tasks ...) are their specs'; the model is pruned and loaded by ``prepare``."""
    return compare.CompareSettings(
        model=str(args.model), prune=f"{args.method}:{args.pattern or args.sparsity}", methods=(), seeds=(),
        train_steps=args.steps, batch_size=args.batch_size,
        prune_samples=args.prune_samples, calibration_samples=args.calibration_samples, num_pairs=args.pairs,
        tasks=None, limit=args.limit, perplexity_passages=args.perplexity_passages,
        eval_batch_size=args.eval_batch_size, device=args.device,
    )  # fmt: skip


def spec_of(name: str, row: dict[str, Any]) -> compare.MethodSpec:
    """A row of the table as the method ``compare`` runs: its kind and recipe (its description apart)."""
    return compare.MethodSpec(name=name, **{key: value for key, value in row.items() if key != "about"})


class Context(compare.Models):
    """What every row shares (``compare.Models``), with the benchmark's two extensions: its own training sets and the
    lost components of each calibration cached on disk beside the pruned model."""

    def __init__(self, dense, pruned, tokenizer, args, pruning_report, cache: Path, timer: recovery.StageTimer):
        super().__init__(dense, pruned, tokenizer, pruning_report, default_device(args.device), compare_settings(args),
                         timer)  # fmt: skip
        self.args, self.cache = args, cache
        self.pruned_fingerprint: str | None = None  # weights_fingerprint of the pruned model

    def components_for(self, calibration: str) -> LostComponents:
        """The lost components of a calibration of CALIBRATIONS, measured once and cached beside the pruned model."""
        if calibration not in self.components:
            folder = self.cache / ("lost_components" if calibration == "general" else f"lost_components-{calibration}")
            if (folder / "lost_components.safetensors").exists():
                components = LostComponents.load(folder)
                components.check_matches(self.pruned)
                self.components[calibration] = components
            else:
                super().components_for(calibration).save(folder)
        return self.components[calibration]

    def training_dataset(self, data: str, samples: int, seed: int, seq_len: int = 128) -> datasets.Dataset:
        return training_dataset(data, self.tokenizer, samples=samples, seed=seed, seq_len=seq_len)


# ---- running -----------------------------------------------------------------------------------------------------


def weights_fingerprint(model: torch.nn.Module) -> str:
    """A short sha256 of a model's weights: which model a row measured. The same Wanda pass on another machine can
    prune differently (float rounding decides near-ties), so the settings alone do not say."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def measured_row(measured: dict[str, Any]) -> dict[str, Any]:
    """What a row (or run) keeps of ``compare.evaluate``'s measurement, under the results file's names: headline
    accuracy per task, average, perplexity, item scores (every row keeps each item's score, for paired errors)."""
    return {"tasks": measured["tasks"], "avg_acc": measured["mean_accuracy"], "ppl": measured["perplexity"],
            "items": measured["items"]}  # fmt: skip


def run_row(name: str, row: dict[str, Any], seed: int, context: Context, output: Path) -> dict[str, Any]:
    """One seed of one row through ``compare.run_method`` (build, train, evaluate, merge); what the results file keeps
    of it."""
    run = compare.run_method(spec_of(name, row), seed, context, context.settings, output)
    return {
        "seed": seed,
        "trainable_params": run["trainable_parameters"],
        **measured_row(run),
        "sparsity_after_merge": run["sparsity_after_merge"],
        "train_seconds": run["train_seconds"],
        "seconds_per_step": run["seconds_per_step"],
        "train_memory_mb": run["train_memory_mb"],
        "peak_cuda_mb": run["peak_cuda_mb"],
        "device": str(context.device),
        "learning_rate": run["learning_rate"],
        "data": run["data"],
        "distill_alpha": run["distill_alpha"],
        "recipe": recipe_of(row),
        "pruned_weights_sha256": context.pruned_fingerprint,
    }


def prepare(args: argparse.Namespace, reference: dict[str, dict[str, Any]], timer: recovery.StageTimer) -> Context:
    """The context every row uses: the pruned model and its general lost components (cached per setting, so a
    restarted benchmark goes straight to the rows), and the dense and pruned rows where no earlier results file has
    them (added to ``reference``)."""
    tokenizer = load_tokenizer(args.model)
    device = default_device(args.device)
    dense = load_model(args.model).to(device)
    # The key of an unstructured run has no pattern part, so caches made before --pattern existed stay found.
    shape = f"{args.sparsity}" + (f"-{args.pattern.replace(':', 'of')}" if args.pattern else "")
    key = f"{Path(str(args.model)).name}-{args.method}-{shape}-p{args.prune_samples}-c{args.calibration_samples}-{args.pairs}"
    cache = args.output / "recovery-work" / "cache" / key
    if (cache / "pruned").exists():
        pruned, pruning_report = load_model(cache / "pruned").to(device), load_report(cache / "pruned")
    else:
        with timer.stage("prune"):
            pruned, pruning_report = pipeline.prune(dense, tokenizer, args.method,
                                                         None if args.pattern else args.sparsity, args.pattern,
                                                         samples=args.prune_samples)  # fmt: skip
        save_pruned(pruned, tokenizer, cache / "pruned", pruning_report)
    context = Context(dense, pruned, tokenizer, args, pruning_report, cache, timer)
    context.components_for("general")
    fingerprints = {"dense": weights_fingerprint(dense), "pruned": weights_fingerprint(pruned)}
    check_same_models(reference, fingerprints)
    context.pruned_fingerprint = fingerprints["pruned"]
    sparsity = measure_sparsity(pruned)["overall_sparsity"]
    for name, model in (("dense", dense), ("pruned", pruned)):
        if name not in reference:
            with timer.stage(f"evaluate {name}"):
                measured = measured_row(compare.evaluate(model, context, context.settings))
            reference[name] = {"method": name, "trainable_params": 0, **measured,
                               "sparsity": sparsity if name == "pruned" else 0.0,
                               "sparsity_after_merge": sparsity if name == "pruned" else 0.0, "device": str(device),
                               "weights_sha256": fingerprints[name]}  # fmt: skip
    return context


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, dict[str, dict[str, Any]]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", type=Path, default=TABLE, help="the rows (default: benchmarks/recovery_methods.yaml)")
    parser.add_argument("--methods", default=None, help="comma-separated rows of the table (default: all)")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--method", default="wanda", help="pruning method")
    parser.add_argument("--sparsity", type=float, default=None, help="fraction of weights to zero (default 0.5)")
    parser.add_argument("--pattern", default=None, metavar="N:M", help="semi-structured pruning, e.g. 2:4")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--limit", type=int, default=40, help="first N items of each task")
    parser.add_argument("--perplexity-passages", type=int, default=48)
    parser.add_argument("--prune-samples", type=int, default=64, help="Wanda/SparseGPT calibration windows")
    parser.add_argument("--calibration-samples", type=int, default=128)
    parser.add_argument("--pairs", type=int, default=256)
    parser.add_argument("--seeds", default="0", help="comma-separated training seeds, every row")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (1 is faster on a busy machine)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--eval-batch-size", type=str, default="auto", help="lm-eval batch size: auto (from the free memory) or a number")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--resume-from", type=Path, nargs="*", default=[],
                        help="results files of shards run with the same settings: their runs are kept, not redone")
    parser.add_argument("--merge-only", action="store_true",
                        help="run nothing, load no model: one report from --output's results and the --resume-from shards")
    parser.add_argument("--paired-with", default=None, metavar="ROW",
                        help="also report every row's accuracy over the tasks above chance minus this row's, same items")  # fmt: skip
    args = parser.parse_args(argv)
    try:
        args.eval_batch_size = parse_batch_size(args.eval_batch_size, "--eval-batch-size")
    except ValueError as error:
        parser.error(str(error))
    try:  # the file records the sparsity an N:M pattern implies, so runs resume alike whichever was given
        args.sparsity, _ = resolve_sparsity(0.5 if args.sparsity is None and not args.pattern else args.sparsity,
                                            args.pattern)  # fmt: skip
        table = load_table(args.table)
    except ValueError as error:
        parser.error(str(error))
    args.methods = args.methods or ",".join(table)
    unknown = sorted(set(args.methods.split(",")) - set(table))
    if unknown:
        parser.error(f"--methods: unknown rows {unknown}; the table {args.table} has {sorted(table)}")
    on_items = [name for name in args.methods.split(",") if table[name]["data"] in ON_EVALUATION_ITEMS]
    if on_items and args.limit > EVALUATED_ITEMS:
        parser.error(f"{', '.join(on_items)} train on the evaluation tasks' items after the first {EVALUATED_ITEMS},"
                     f" and --limit {args.limit} would score some of them: give --limit {EVALUATED_ITEMS} or less,"
                     " or leave those rows out of --methods")  # fmt: skip
    if args.paired_with is not None and args.paired_with not in {"dense", "pruned", *table}:
        parser.error(f"--paired-with: unknown row {args.paired_with!r}; give dense, pruned or a row of the table")
    missing = [str(path) for path in args.resume_from if not path.is_file()]
    if missing:
        parser.error(f"--resume-from: no results file at {', '.join(missing)}; give the recovery.json of a shard")
    return args, table


def main(argv: list[str] | None = None) -> None:
    args, table = parse_args(argv)
    command = shlex.join(["python", "benchmarks/recovery.py", *(sys.argv[1:] if argv is None else argv)])
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    results_file = args.output / "recovery.json"
    earlier = json.loads(results_file.read_text()) if results_file.exists() else {}
    shards = {path: json.loads(path.read_text()) for path in args.resume_from}
    settings = json_settings(vars(args))
    alike = [report for report in (earlier, *shards.values()) if report and measured_alike(report["settings"], settings)]
    # The file keeps the runs and commands of the shards merged into it before, so it keeps naming them.
    if earlier in alike:
        settings["resume_from"] = list(dict.fromkeys(earlier["settings"].get("resume_from", []) + settings["resume_from"]))
    commands = list(dict.fromkeys([c for report in alike for c in report.get("commands", [])] + [command]))
    previous, dropped = finished_runs([earlier, *shards.values()], settings, table)
    if dropped:
        print(f"left out, trained otherwise than the table now says or retired: {', '.join(dropped)}")
    reference = {row["method"]: row for row in previous.pop("__reference__", [])}
    runs = previous
    mixed = runs_on_other_weights(reference, runs)
    if mixed:
        raise SystemExit(f"{', '.join(mixed)} trained on other pruned weights than the pruned row measured: merge"
                         " results made from the same pruned model (another machine can prune differently)")  # fmt: skip
    timer = recovery.StageTimer()
    if args.merge_only:
        if not {"dense", "pruned"} <= set(reference) or not alike:
            raise SystemExit(f"--merge-only: no dense and pruned rows measured with these settings in"
                             f" {[str(p) for p in (results_file, *args.resume_from) if p.exists()]}; give the shards'"
                             " recovery.json with --resume-from and the measurement flags they ran with")  # fmt: skip
        pruning_report, heads_total, plan = alike[0]["pruning"], alike[0]["heads_total"], []
        settings |= {"methods": ",".join(runs), "seeds": None}  # what it holds, not the flags it ignored
    else:
        context = prepare(args, reference, timer)
        pruning_report, heads_total = context.report, context.components_for("general").num_heads
        methods, seeds = args.methods.split(","), [int(seed) for seed in args.seeds.split(",")]
        # First seed of every row first, so an interrupted run still has one full comparison.
        plan = sorted(((name, seed) for name in methods for seed in seeds),
                      key=lambda item: (item[1] != seeds[0], methods.index(item[0])))  # fmt: skip
    args.output.mkdir(parents=True, exist_ok=True)
    done = {(name, run["seed"]) for name, row_runs in runs.items() for run in row_runs}
    chance = above_chance(reference["dense"], args.limit)
    failures: dict[str, str] = {}
    shard_seconds, earlier_seconds = shard_times(results_file, earlier, shards), own_seconds(earlier)

    def write_report() -> dict[str, Any]:
        rows = [reference["dense"], reference["pruned"]] + [
            aggregate(name, row_runs, reference["dense"], reference["pruned"], chance["tasks"])
            for name, row_runs in runs.items() if row_runs
        ]  # fmt: skip
        report: dict[str, Any] = {"settings": settings, "commands": commands, "rows": rows, "above_chance": chance}
        if args.paired_with:
            report["paired_with"] = {"method": args.paired_with,
                                     "differences": paired_differences(rows, args.paired_with, chance["tasks"])}  # fmt: skip
        own = earlier_seconds + time.perf_counter() - started
        report |= {"failures": failures, "heads_total": heads_total, "stage_seconds": timer.seconds,
                   "pruning": {k: pruning_report.get(k) for k in ("method", "sparsity_target", "pattern", "seconds")},
                   "own_seconds": own, "shard_seconds": shard_seconds, "total_seconds": own + sum(shard_seconds.values()),
                   "finished": all(key in done for key in plan)}  # fmt: skip
        results_file.write_text(json.dumps(report, indent=2) + "\n")
        (args.output / "recovery.md").write_text(markdown_table(report) + "\n")
        plot(report, args.output / "recovery.png")
        return report

    for name, seed in tqdm(plan, desc="rows x seeds"):
        if (name, seed) in done:
            continue
        try:
            runs.setdefault(name, []).append(run_row(name, table[name], seed, context, args.output / "recovery-work"))
            done.add((name, seed))
        except Exception as error:  # noqa: BLE001 - one broken row must not cost the others' results
            failures[f"{name}-seed{seed}"] = f"{type(error).__name__}: {error}"
            print(f"{name} seed {seed} failed: {failures[f'{name}-seed{seed}']}")
        write_report()
    report = write_report()  # also when every planned run was already done: merges the shards given
    print(markdown_table(report))
    print(f"\ntotal {report['total_seconds'] / 60:.1f} min; results in {results_file}")


if __name__ == "__main__":
    main()
