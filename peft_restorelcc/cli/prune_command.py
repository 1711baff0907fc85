"""``restorelcc prune``: prune a model (magnitude, Wanda, SparseGPT; unstructured, N:M or structured) and save it."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..pruning.choices import METHODS, resolve_sparsity
from .options import add_common_arguments, add_deprecated, add_model_arguments, check_common_arguments, check_output_dir
from .summary import print_rows


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "prune",
        help="prune a model and save it with a pruning report",
        description=(
            "Prune every projection inside the decoder blocks (embeddings and lm_head stay dense) and save the model, "
            "its tokenizer and pruning_report.json. Unstructured: --method M --sparsity S. N:M: --method M "
            "--pattern 2:4 (at most N non-zeros in every M consecutive weights; implies sparsity 1-N/M, so "
            "--sparsity may be omitted). Structured (Llama family): --structured-heads F and/or --structured-ffn F "
            "remove the same number of heads / FFN channels from every layer; combine with --method to sparsify "
            "the smaller model as well."
        ),
    )
    add_model_arguments(parser)
    parser.add_argument("--method", choices=METHODS, default=None, help="unstructured / N:M pruning method")
    parser.add_argument("--sparsity", type=float, default=None, metavar="S", help="fraction of weights to zero, [0, 1)")
    parser.add_argument("--pattern", default=None, metavar="N:M", help="semi-structured pattern, e.g. 2:4 or 4:8")
    parser.add_argument(
        "--structured-heads", type=float, default=0.0, metavar="F", help="fraction of query heads to remove per layer"
    )
    parser.add_argument(
        "--structured-ffn", type=float, default=0.0, metavar="F", help="fraction of FFN channels to remove per layer"
    )
    parser.add_argument("--samples", type=int, default=128, metavar="N", help="calibration windows")
    add_deprecated(parser, "--calibration-samples", "--samples", dest="samples", type=int)
    parser.add_argument("--seq-len", type=int, default=128, metavar="L", help="tokens per calibration window")
    parser.add_argument("--batch-size", type=int, default=8, metavar="B", help="calibration batch size")
    add_common_arguments(parser, seed=False)
    parser.add_argument("--output", required=True, metavar="DIR", help="new or empty output directory")
    parser.set_defaults(func=run)


def _check_args(args: argparse.Namespace) -> tuple[float, bool]:
    """Every flag check that needs no model, so that mistakes fail in a second. Returns (sparsity, structured)."""
    check_output_dir(args.output)
    check_common_arguments(args)
    for flag, value in (("--structured-heads", args.structured_heads), ("--structured-ffn", args.structured_ffn)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{flag} {value} is outside [0, 1): pass the fraction to remove, e.g. 0.25.")
    structured = args.structured_heads > 0 or args.structured_ffn > 0
    sparsity = 0.0
    if args.method is None:
        if args.sparsity is not None or args.pattern is not None:
            raise ValueError("--sparsity/--pattern need --method (magnitude, wanda or sparsegpt).")
        if not structured:
            raise ValueError(
                "nothing to do: pass --method with --sparsity or --pattern, and/or --structured-heads/--structured-ffn."
            )
    else:
        sparsity, _ = resolve_sparsity(args.sparsity, args.pattern)
    if args.samples < 1 or args.seq_len < 1 or args.batch_size < 1:
        raise ValueError("--samples, --seq-len and --batch-size must be positive integers.")
    return sparsity, structured


def _max_positions(model: Any) -> int | None:
    config = model.config
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _load(args: argparse.Namespace, needs_calibration: bool) -> tuple[Any, Any]:
    """``(model on --device, tokenizer or None)``; a tokenizer is required only when pruning calibrates."""
    from ..io import load_model, load_tokenizer, model_reference, name_model_source, resolve_model_path
    from ..io.devices import default_device

    model_path = resolve_model_path(args.model, args.revision)
    model = load_model(model_path, dtype=args.dtype)
    name_model_source(model, model_reference(args.model, model_path))  # recorded as the pruned model's pruned_from
    model.to(default_device(args.device))
    try:
        tokenizer = load_tokenizer(model_path)
    except (OSError, ValueError, TypeError) as error:
        if needs_calibration:
            raise ValueError(
                f"cannot load a tokenizer from {args.model!r} ({error}); calibration needs one."
            ) from error
        print(f"restorelcc prune: warning: no tokenizer saved ({error})", file=sys.stderr)
        tokenizer = None
    return model, tokenizer


def _calibration(args: argparse.Namespace, model: Any, tokenizer: Any) -> tuple[Any, dict[str, Any]]:
    """Token windows from the bundled training passages for Wanda/SparseGPT/structured pruning, and their record."""
    from ..data import text_passages
    from ..pruning import calibration_windows

    limit = _max_positions(model)
    if limit is not None and args.seq_len > limit:
        raise ValueError(f"--seq-len {args.seq_len} exceeds the model's {limit} positions: lower it.")
    calibration = calibration_windows(tokenizer, text_passages("train"), args.samples, args.seq_len)
    return calibration, {"source": "lambada train passages", "samples": args.samples, "seq_len": args.seq_len}


def run(args: argparse.Namespace) -> int:
    sparsity, structured = _check_args(args)
    from ..pruning import measure_sparsity, prune_model, save_pruned, structured_prune_heads, summary_rows  # torch

    needs_calibration = args.method in ("wanda", "sparsegpt") or structured
    model, tokenizer = _load(args, needs_calibration)
    calibration, calibration_info = _calibration(args, model, tokenizer) if needs_calibration else (None, None)
    structured_report = None
    if structured:
        structured_report = structured_prune_heads(
            model,
            args.structured_heads,
            args.structured_ffn,
            calibration_input_ids=calibration,
            batch_size=args.batch_size,
        )
    if args.method is not None:
        report = prune_model(
            model,
            args.method,
            sparsity,
            pattern=args.pattern,
            calibration_input_ids=calibration,
            batch_size=args.batch_size,
        )
        if structured_report is not None:
            report["method"] = f"structured+{args.method}"
            report["seconds"] += structured_report["seconds"]
    else:
        measured = measure_sparsity(model)
        report = {
            "method": "structured",
            "sparsity_target": 0.0,
            "pattern": None,
            "layers": measured["layers"],
            "overall_sparsity": measured["overall_sparsity"],
            "seconds": structured_report["seconds"],
        }
    report["structured"] = structured_report
    report["source_model"] = str(args.model)
    report["calibration"] = calibration_info

    output = save_pruned(model, tokenizer, args.output, report)
    rows = [*summary_rows(report), ("output", str(output))]
    print_rows(rows)
    return 0
