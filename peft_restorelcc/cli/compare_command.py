"""``restorelcc compare``: RestoreLCC against LoRA, DoRA and IA3 on one pruned model (``peft_restorelcc.compare``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..compare import settings as comparison
from ..compare.settings import METHODS, CompareSettings, parse_methods, parse_prune
from ..training.choices import DEFAULT_DATA, parse_batch_size
from .options import (
    add_common_arguments,
    add_deprecated,
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
            "seed on the same data and steps, evaluate each on the same items, merge it once, and print "
            "accuracy, the share of the dense-pruned gap recovered, trainable parameters, time, peak memory, "
            "the sparsity left after merging, the merged model's speed against the pruned one and whether stock "
            "transformers reloads it. compare.json is written after every run; a failed run is recorded and the "
            "others go on (exit status 1); --resume keeps the finished runs and runs the failed ones again."
        ),
    )
    add_model_arguments(parser, required=False, default="smollm2-135m", aliases=("--dense",), help="the dense model "
                        "(--dense is the same flag): embedded name, local directory, or Hub id org/name (with "
                        "--revision)")  # fmt: skip
    models = parser.add_mutually_exclusive_group()
    models.add_argument("--pruned", default=None, metavar="MODEL", help="a pruned copy of --model (name, dir or id)")
    models.add_argument(
        "--prune",
        default="wanda:0.5",
        metavar="METHOD:RATIO",
        help="prune --model on the fly: wanda:0.5, sparsegpt:2:4, magnitude:0.5 (default wanda:0.5)",
    )
    parser.add_argument("--pruned-revision", default=None, metavar="REV", help="revision of a Hub id given to --pruned")
    parser.add_argument("--methods", default="restorelcc,lora", help=f"comma-separated, of {', '.join(METHODS)} "
                        "(masked-lora: LoRA whose update is masked by the pruned weights' zeros, so its merge keeps "
                        "them; needs a pruned model)")  # fmt: skip
    parser.add_argument("--seeds", default="0", help="comma-separated training seeds, for every method")
    parser.add_argument("--lora-rank", type=int, default=8, help="r of LoRA, DoRA and masked LoRA (all linear layers)")
    parser.add_argument("--num-heads", dest="heads", type=float, default=0.25, metavar="K",
                        help="RestoreLCC heads: a count, or a fraction < 1 (as calibrate --num-heads)")  # fmt: skip
    add_deprecated(parser, "--heads", "--num-heads", dest="heads", type=float)
    parser.add_argument("--lr", default="", metavar="METHOD=RATE,...",
                        help="learning rates overriding the standard ones (" +
                        ", ".join(f"{name} {rate:g}" for name, rate in METHODS.items()) + ")")  # fmt: skip
    parser.add_argument("--data", default=DEFAULT_DATA, help="training data, as `restorelcc run --data`: a built-in "
                        "source, a file, or a Hub dataset id org/name[:split]")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--train-steps", "--steps", dest="train_steps", type=int, default=None, metavar="N",
                        help="optimizer steps on N x --batch-size examples, each seen once (default 200)")  # fmt: skip
    length.add_argument("--epochs", type=float, default=None, metavar="E",
                        help="train by epochs instead: E passes over --train-samples examples")  # fmt: skip
    parser.add_argument("--train-samples", type=int, default=None, metavar="N",
                        help="size of the training set (default: steps x batch size; 2000 with --epochs)")  # fmt: skip
    parser.add_argument("--seq-len", type=int, default=128, help="longest training sequence, in tokens")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--prune-samples", type=int, default=64)
    parser.add_argument("--calibration-samples", type=int, default=128)
    parser.add_argument("--num-pairs", type=int, default=256)
    add_task_arguments(parser, default_help="default: paper-bundled")
    parser.add_argument("--limit", type=int, default=100, help="items per task (0: all)")
    parser.add_argument("--perplexity-passages", type=int, default=64)
    parser.add_argument("--eval-batch-size", default="auto")
    add_common_arguments(parser, seed=False)
    parser.add_argument("--output", default=DEFAULT_OUTPUT, metavar="DIR",
                        help=f"{comparison.RESULTS_FILE}, {comparison.TABLE_FILE}, {comparison.PLOT_FILE}")  # fmt: skip
    parser.add_argument("--resume", action="store_true", help=f"keep the finished runs of --output's "
                        f"{comparison.RESULTS_FILE}, run the failed ones again")  # fmt: skip
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


def _training_length(args: argparse.Namespace) -> tuple[int | None, float | None]:
    """(steps, None) or (None, epochs); --train-samples and --seq-len checked too."""
    import math

    if args.train_samples is not None and args.train_samples < 1:
        raise ValueError(f"--train-samples must be >= 1, got {args.train_samples}")
    if args.seq_len < 8:
        raise ValueError(f"--seq-len must be >= 8 tokens, got {args.seq_len}")
    if args.epochs is not None:
        if not (math.isfinite(args.epochs) and args.epochs > 0):
            raise ValueError(f"--epochs must be > 0, got {args.epochs}")
        return None, args.epochs
    steps = 200 if args.train_steps is None else args.train_steps
    if steps < 1:
        raise ValueError(f"--train-steps (--steps) must be >= 1, got {steps}")
    return steps, None


def settings_of(args: argparse.Namespace) -> CompareSettings:
    """The checked settings from the flags: every bad flag fails here, with one line, before any model loads."""
    if args.pruned is None:
        parse_prune(args.prune)
    try:
        seeds = [int(seed) for seed in args.seeds.split(",")]
    except ValueError:
        raise ValueError(f"--seeds {args.seeds!r}: give comma-separated integers, e.g. 0,1") from None
    if args.batch_size < 1 or args.lora_rank < 1 or args.heads <= 0:
        raise ValueError("--batch-size and --lora-rank must be >= 1, and --num-heads > 0")
    train_steps, epochs = _training_length(args)
    from ..evaluation.tasks import resolve_tasks
    from ..training.trainer import check_data_source

    tasks = resolve_tasks(args.tasks.split(","), args.include_path) if args.tasks else None
    check_common_arguments(args)
    methods = parse_methods(args.methods)
    _check_masked_lora(args, methods)
    check_data_source(args.data)  # last: a Hub dataset is read here
    return CompareSettings(
        model=args.model, revision=args.revision, pruned=args.pruned, pruned_revision=args.pruned_revision,
        prune=args.prune, methods=methods, seeds=list(dict.fromkeys(seeds)),
        lora_rank=args.lora_rank, heads=args.heads, learning_rates=_learning_rates(args.lr), data=args.data,
        train_steps=train_steps, epochs=epochs, train_samples=args.train_samples, seq_len=args.seq_len,
        batch_size=args.batch_size, prune_samples=args.prune_samples,
        calibration_samples=args.calibration_samples, num_pairs=args.num_pairs, tasks=tasks,
        include_path=args.include_path, limit=args.limit,
        perplexity_passages=args.perplexity_passages, device=args.device, dtype=args.dtype,
        eval_batch_size=parse_batch_size(args.eval_batch_size, "--eval-batch-size"),
    )  # fmt: skip


def _check_masked_lora(args: argparse.Namespace, methods: list[str]) -> None:
    """masked-lora keeps the pruned model's zeros: a --pruned model with none in its decoder's linear weights (not
    pruned) is a bad combination, told in one line before any model loads (read tensor by tensor from its files)."""
    if "masked-lora" not in methods or args.pruned is None:
        return  # --prune always leaves zeros
    from ..io import resolve_model_path
    from ..io.checks import decoder_weight_zeros

    if decoder_weight_zeros(resolve_model_path(args.pruned, args.pruned_revision)) == 0:
        raise ValueError(f"--methods masked-lora keeps the pruned model's zeros, but --pruned {args.pruned} has no zero "
                         "weight in its decoder layers (it is not pruned): pass a pruned model, or drop masked-lora")


def run(args: argparse.Namespace) -> int:
    settings = settings_of(args)
    from ..compare.runs import compare  # torch: after the flags are checked
    from ..compare.table import compare_table, plot_compare

    output = Path(args.output)
    if not args.resume:
        check_output_dir(output, hint=", remove it, or give --resume to continue its runs")
    from ..io.files import output_lock

    with output_lock(output):  # a second comparison into the same --output fails at once, with one line
        report = compare(settings, output, resume=args.resume)
        table = compare_table(report)
        (output / comparison.TABLE_FILE).write_text(table + "\n")
    print(table)
    plot = plot_compare(report, output / comparison.PLOT_FILE)
    print(f"\nplot: {plot}" if plot is not None else f"\nplot: not drawn, {comparison.PLOT_MISSING}")
    print(f"results: {output / comparison.RESULTS_FILE}")
    if report["failed"]:
        names = ", ".join(f"{failure['method']} seed {failure['seed']}" for failure in report["failed"])
        print(f"failed: {names} (--resume runs them again)", file=sys.stderr)
        return 1
    return 0
