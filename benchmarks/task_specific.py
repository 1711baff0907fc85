"""Task-specific recovery against the general recipe, on one task's held-out items.

One pruned model (Wanda 50% SmolLM2-135M by default), two RestoreLCC arms that differ only in their data:

- ``general``: calibration prompts and probe pairs from the bundled training-side data, trained on the default
  data (``--data instruction-and-cloze``), as ``restorelcc calibrate`` / ``train`` do without data flags;
- ``task``: prompts, pairs and training examples from the task's own training-side items
  (``restorelcc calibrate --task T``, ``restorelcc train --data task:T``): items after the first ``--scored-items``,
  none sharing a question (HellaSwag: a source video) with a scored one;

same seed, same counts, same steps; both scored on the task's first ``--eval-items`` items (never trained on).
``--arms pruned`` adds the pruned model itself. Reported: each arm's accuracy (acc_norm where the task has it) and
the paired difference task - general on the same items with its standard error (``recovery.paired_stderr``).

    python benchmarks/task_specific.py --task hellaswag --steps 200 --threads 1

Arms may run in separate processes (``--arms task`` and ``--arms general,pruned``, same other flags): each arm
writes OUTPUT/arms/ARM.json, and after each one OUTPUT/results.json is rewritten from every arm written with the
same settings, once both RestoreLCC arms are there.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from peft_restorelcc.training.choices import parse_batch_size

ARMS = ("pruned", "general", "task")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="hellaswag", help="a bundled evaluation task with items beyond the scored")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--method", default="wanda", choices=("magnitude", "wanda", "sparsegpt"))
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--prune-samples", type=int, default=64)
    parser.add_argument("--calibration-samples", type=int, default=256)
    parser.add_argument("--pairs", type=int, default=256)
    parser.add_argument("--negatives", default="auto", help="how the probe's wrong answers are chosen")
    parser.add_argument("--heads", type=float, default=0.25)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--train-samples", type=int, default=2000)
    parser.add_argument("--scored-items", type=int, default=300, help="items reserved for evaluation")
    parser.add_argument("--eval-items", type=int, default=300, help="scored items evaluated (<= --scored-items)")
    parser.add_argument("--eval-batch-size", type=str, default="auto", help="lm-eval batch size: auto (from the free memory) or a number")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--arms", default="general,task", help=f"comma-separated, of {', '.join(ARMS)}")
    parser.add_argument("--output", default=None, help="default: benchmarks/results/task-specific-<task>")
    args = parser.parse_args(argv)
    try:
        args.eval_batch_size = parse_batch_size(args.eval_batch_size, "--eval-batch-size")
    except ValueError as error:
        parser.error(str(error))
    args.arms = [arm.strip() for arm in args.arms.split(",") if arm.strip()]
    unknown = sorted(set(args.arms) - set(ARMS))
    if unknown:
        parser.error(f"unknown arm(s) {unknown}; choose from {list(ARMS)}")
    if not 1 <= args.eval_items <= args.scored_items:
        parser.error("--eval-items must be between 1 and --scored-items: only scored items are held out")
    if args.output is None:
        args.output = f"benchmarks/results/task-specific-{args.task}"
    return args


def settings_of(args: argparse.Namespace) -> dict[str, Any]:
    """The settings every arm must share to be compared (the arm list aside)."""
    return {key: value for key, value in vars(args).items() if key not in ("arms", "output", "threads")}


def paired_difference(items_a: str, items_b: str) -> dict[str, float]:
    """Mean of a - b over the same items (per-item 0/1 strings) and its paired standard error."""
    from peft_restorelcc.evaluation.statistics import item_scores, paired_stderr

    a, b = item_scores(items_a), item_scores(items_b)
    return {
        "difference": float(a.mean() - b.mean()),
        "stderr": paired_stderr({"task": a}, {"task": b}),
        "items": int(len(a)),
    }


def combine(arms: dict[str, dict[str, Any]], settings: dict[str, Any], command: str) -> dict[str, Any]:
    """results.json from the arms' records: accuracy per arm, per-item scores, task - general (and each arm -
    pruned) paired differences. Raises ValueError if the arms did not share settings or the pruned model."""
    for name, arm in arms.items():
        if arm["settings"] != settings:
            raise ValueError(f"arm {name} ran with other settings: {arm['settings']} (here {settings})")
    if len({arm["pruned_fingerprint"] for arm in arms.values()}) != 1:
        raise ValueError("the arms ran on different pruned models")
    results: dict[str, Any] = {
        "command": command,
        "commands": sorted({arm["command"] for arm in arms.values()}),
        "settings": settings,
        "metric": next(iter(arms.values()))["metric"],
        "accuracy": {name: arm["accuracy"] for name, arm in arms.items()},
        "items": {name: arm["items"] for name, arm in arms.items()},
        "arms": {name: {k: v for k, v in arm.items() if k not in ("items", "settings")} for name, arm in arms.items()},
        "differences": {},
    }
    if "task" in arms and "general" in arms:
        results["differences"]["task - general"] = paired_difference(arms["task"]["items"], arms["general"]["items"])
    if "pruned" in arms:
        for name in ("general", "task"):
            if name in arms:
                results["differences"][f"{name} - pruned"] = paired_difference(
                    arms[name]["items"], arms["pruned"]["items"]
                )
    return results


def write_json(path: Path, record: dict[str, Any]) -> None:
    """Write atomically (a reader never sees half a file; two processes may finish together)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(handle, "w") as stream:
        stream.write(json.dumps(record, indent=2) + "\n")
    os.replace(staging, path)


def _restore_arm(name: str, args: argparse.Namespace, dense: Any, model: Any, tokenizer: Any, record: dict) -> Any:
    """Calibrate, build and train one RestoreLCC arm through the pipeline; fills ``record``, returns the model."""
    from peft_restorelcc import data, pipeline
    from peft_restorelcc.evaluation.statistics import trainable_parameters
    from peft_restorelcc.training.choices import DEFAULT_DATA, TASK_DATA_PREFIX

    begin = time.perf_counter()
    inputs = pipeline.calibration_inputs(
        task=args.task if name == "task" else None, samples=args.calibration_samples, pairs=args.pairs,
        negatives=args.negatives, scored_items=args.scored_items, seed=args.seed,
    )  # fmt: skip
    components = pipeline.calibrate(dense, model, tokenizer, inputs, seed=args.seed)
    record["seconds"]["calibrate"] = time.perf_counter() - begin
    model = pipeline.build_adapter(model, components, args.heads, init="paper")
    training_data = TASK_DATA_PREFIX + args.task if name == "task" else DEFAULT_DATA
    dataset = pipeline.training_data(training_data, tokenizer, samples=args.train_samples, seed=args.seed)
    with tempfile.TemporaryDirectory() as checkpoints:
        metrics = pipeline.train(
            model, tokenizer, dataset, checkpoints, learning_rate=args.lr, batch_size=args.batch_size,
            max_steps=args.steps, seed=args.seed, save_steps=10**9, device="cpu",
        )  # fmt: skip
    record.update(
        calibration={
            "prompts": len(inputs.prompts),
            "pairs": len(inputs.pairs),
            "prompts_source": inputs.prompts_source,
            "negatives": inputs.negatives,
            "notes": inputs.notes,
        },
        training={
            "data": training_data,
            "sequences": len(dataset),
            "steps": metrics["steps"],
            "final_loss": metrics["final_loss"],
            "seconds_per_step": metrics["seconds_per_step"],
        },
        heads=model.peft_config["default"].heads,
        trainable_parameters=trainable_parameters(model),
    )
    record["seconds"]["train"] = metrics["seconds"]
    if name == "task":  # the guarantee, checked on what was used: no scored item fed this arm
        used = {item["row"] for item in data.task_items(args.task, args.scored_items, args.seed)}
        assert not used & set(data.task_split(args.task, args.scored_items)["scored"])
        record["training_side_rows"] = len(used)
    return model


def run_arm(name: str, args: argparse.Namespace, dense: Any, pruned: Any, tokenizer: Any) -> dict[str, Any]:
    import copy

    from peft_restorelcc import pipeline
    from peft_restorelcc.evaluation.statistics import headline_metric

    record: dict[str, Any] = {"seconds": {}}
    model = copy.deepcopy(pruned)
    if name != "pruned":
        model = _restore_arm(name, args, dense, model, tokenizer, record)
    begin = time.perf_counter()
    results = pipeline.evaluate(
        model, tokenizer, tasks=[args.task], limit=args.eval_items, perplexity_passages=0,
        batch_size=args.eval_batch_size, per_item=True,
    )  # fmt: skip
    record["seconds"]["evaluate"] = time.perf_counter() - begin
    metric = headline_metric(results["tasks"][args.task])
    record.update(
        metric=metric,
        accuracy=results["tasks"][args.task][metric],
        stderr=results["tasks"][args.task][f"{metric}_stderr"],
        items=results["items"][args.task][metric],
    )
    return record


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = "python " + " ".join([os.path.relpath(sys.argv[0]), *(sys.argv[1:] if argv is None else argv)])
    import torch

    from peft_restorelcc import pipeline
    from peft_restorelcc.calibration import model_fingerprint

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    output = Path(args.output)
    dense, tokenizer = pipeline.load(args.model)
    begin = time.perf_counter()
    pruned, report = pipeline.prune(dense, tokenizer, args.method, args.sparsity, None, args.prune_samples)
    prune_seconds = time.perf_counter() - begin
    fingerprint = json.dumps(model_fingerprint(pruned), sort_keys=True)
    print(f"pruned ({args.method} {args.sparsity}) in {prune_seconds:.0f} s", flush=True)
    settings = settings_of(args)
    for name in args.arms:
        record = run_arm(name, args, dense, pruned, tokenizer)
        record.update(settings=settings, pruned_fingerprint=fingerprint, prune_seconds=prune_seconds, command=command)
        write_json(output / "arms" / f"{name}.json", record)
        print(f"{name}: {record['metric']} {record['accuracy']:.4f} on {args.eval_items} {args.task} items", flush=True)
        _write_results(output, settings, command)
    return 0


def _write_results(output: Path, settings: dict[str, Any], command: str) -> None:
    """results.json from every arm written so far with these settings, once both RestoreLCC arms are there."""
    present = {}
    for name in ARMS:
        path = output / "arms" / f"{name}.json"
        if path.is_file():
            arm = json.loads(path.read_text())
            if arm["settings"] == settings:
                present[name] = arm
            else:
                print(f"{path} left out: written with other settings", flush=True)
    if not {"general", "task"} <= set(present):
        print(f"results.json waits for the arms {sorted({'general', 'task'} - set(present))}", flush=True)
        return
    results = combine(present, settings, command)
    write_json(output / "results.json", results)
    for label, difference in results["differences"].items():
        print(f"{label}: {difference['difference']:+.4f} (paired SE {difference['stderr']})", flush=True)
    print(f"written {output / 'results.json'}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
