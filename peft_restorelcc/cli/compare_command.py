"""``restorelcc compare``: RestoreLCC against LoRA, DoRA and IA3 on one pruned model (``peft_restorelcc.compare``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..compare import METHODS, CompareSettings, compare, compare_table, parse_methods, parse_prune, plot_compare
from ..logits import parse_batch_size
from ..training import DEFAULT_DATA
from .options import (
    add_common_arguments,
    add_model_arguments,
    add_task_arguments,
    check_common_arguments,
    check_output_dir,
)

DEFAULT_OUTPUT = "runs/restorelcc-compare"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "compare",
        help="RestoreLCC against LoRA / DoRA / IA3 on one pruned model: accuracy, gap recovered, cost, sparsity",
        description=(
            "Prune MODEL (--prune) or load a pruned one (--pruned), then train every method of --methods for every "
            "seed on the same data and steps, evaluate each on the same items, merge it on a copy, and print "
            "accuracy, the share of the dense-pruned gap recovered, trainable parameters, time, peak memory and "
            "the sparsity left after merging. results.json is written after every run; --resume keeps its runs."
        ),
    )
    add_model_arguments(parser, required=False, default="smollm2-135m", help="the dense model: embedded name, local "
                        "directory, or Hub id org/name (with --revision)")  # fmt: skip
    models = parser.add_mutually_exclusive_group()
    models.add_argument("--pruned", default=None, metavar="MODEL", help="a pruned copy of --model (name, dir or id)")
    models.add_argument(
        "--prune",
        default="wanda:0.5",
        metavar="METHOD:RATIO",
        help="prune --model on the fly: wanda:0.5, sparsegpt:2:4, magnitude:0.5 (default wanda:0.5)",
    )
    parser.add_argument("--pruned-revision", default=None, metavar="REV", help="revision of a Hub id given to --pruned")
    parser.add_argument("--methods", default="restorelcc,lora", help=f"comma-separated, of {', '.join(METHODS)}")
    parser.add_argument("--seeds", default="0", help="comma-separated training seeds, for every method")
    parser.add_argument("--lora-rank", type=int, default=8, help="r of LoRA and DoRA (all linear layers)")
    parser.add_argument("--heads", type=float, default=0.25, help="RestoreLCC heads: a count, or a fraction < 1")
    parser.add_argument("--lr", default="", metavar="METHOD=RATE,...",
                        help="learning rates overriding the standard ones (" +
                        ", ".join(f"{name} {rate:g}" for name, rate in METHODS.items()) + ")")  # fmt: skip
    parser.add_argument("--data", default=DEFAULT_DATA, help="training data, as `restorelcc run --data`: a built-in "
                        "source, a file, or a Hub dataset id org/name[:split]")
    parser.add_argument("--train-steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--prune-samples", type=int, default=64)
    parser.add_argument("--calibration-samples", type=int, default=128)
    parser.add_argument("--num-pairs", type=int, default=256)
    add_task_arguments(parser, default_help="default: paper-bundled")
    parser.add_argument("--limit", type=int, default=100, help="items per task (0: all)")
    parser.add_argument("--perplexity-passages", type=int, default=64)
    parser.add_argument("--eval-batch-size", default="auto")
    add_common_arguments(parser, seed=False)
    parser.add_argument("--output", default=DEFAULT_OUTPUT, metavar="DIR", help="results.json, results.md, compare.png")
    parser.add_argument("--resume", action="store_true", help="keep the finished runs of --output's results.json")
    parser.set_defaults(func=run)


def _learning_rates(text: str) -> dict[str, float]:
    rates = {}
    for part in filter(None, text.split(",")):
        name, _, value = part.partition("=")
        try:
            rates[name.strip()] = float(value)
        except ValueError:
            raise ValueError(f"--lr {text!r}: give METHOD=RATE pairs, e.g. lora=2e-4") from None
        if name.strip() not in METHODS or rates[name.strip()] <= 0:
            raise ValueError(f"--lr {text!r}: methods are {list(METHODS)}, rates > 0")
    return rates


def settings_of(args: argparse.Namespace) -> CompareSettings:
    """The checked settings from the flags: every bad flag fails here, with one line, before any model loads."""
    if args.pruned is None:
        parse_prune(args.prune)
    try:
        seeds = [int(seed) for seed in args.seeds.split(",")]
    except ValueError:
        raise ValueError(f"--seeds {args.seeds!r}: give comma-separated integers, e.g. 0,1") from None
    if args.train_steps < 1 or args.batch_size < 1 or args.lora_rank < 1 or args.heads <= 0:
        raise ValueError("--train-steps, --batch-size and --lora-rank must be >= 1, and --heads > 0")
    from ..evaluation import resolve_tasks
    from ..training import check_data_source

    tasks = resolve_tasks(args.tasks.split(","), args.include_path) if args.tasks else None
    check_common_arguments(args)
    check_data_source(args.data)  # last: a Hub dataset is read here
    return CompareSettings(
        model=args.model, revision=args.revision, pruned=args.pruned, pruned_revision=args.pruned_revision,
        prune=args.prune, methods=parse_methods(args.methods), seeds=list(dict.fromkeys(seeds)),
        lora_rank=args.lora_rank, heads=args.heads, learning_rates=_learning_rates(args.lr), data=args.data,
        train_steps=args.train_steps, batch_size=args.batch_size, prune_samples=args.prune_samples,
        calibration_samples=args.calibration_samples, num_pairs=args.num_pairs, tasks=tasks,
        include_path=args.include_path, limit=args.limit,
        perplexity_passages=args.perplexity_passages, device=args.device, dtype=args.dtype,
        eval_batch_size=parse_batch_size(args.eval_batch_size, "--eval-batch-size"),
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    settings = settings_of(args)
    output = Path(args.output)
    if not args.resume:
        check_output_dir(output, hint=", remove it, or give --resume to continue its runs")
    report = compare(settings, output, resume=args.resume)
    table = compare_table(report)
    (output / "results.md").write_text(table + "\n")
    print(table)
    plot = plot_compare(report, output / "compare.png")
    if plot is not None:
        print(f"\nplot: {plot}")
    print(f"results: {output / 'results.json'}")
    return 0
