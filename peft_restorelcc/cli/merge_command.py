"""``restorelcc merge``: fold an adapter into the pruned model and save a model that stock transformers loads.

RestoreLCC folds into the attention output projections' biases (``export.save_merged``): the weights, and so the
sparsity, stay exactly as pruned. Other PEFT types are merged with ``merge_and_unload()``; LoRA adds a dense
``B @ A`` to every adapted weight, and the printed sparsity after the merge shows what that costs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..files import staged_output_dir

REPORT_FILE = "merge_report.json"
FORMATS = ("plain", "compressed-tensors")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "merge",
        help="merge an adapter into the pruned model and save it (RestoreLCC keeps the sparsity exactly)",
        description=(
            "Load --model, apply --adapter, merge it into the weights and save a plain transformers model (with the "
            f"tokenizer and {REPORT_FILE}) to --output. Prints the adapter type and the sparsity of the decoder "
            "projections before and after: RestoreLCC merges into attention output biases and keeps every zero; "
            "LoRA densifies the weights it adapts."
        ),
    )
    parser.add_argument("--model", required=True, help="pruned model: embedded name or local directory")
    parser.add_argument("--adapter", required=True, metavar="DIR", help="trained adapter directory")
    parser.add_argument("--output", required=True, metavar="DIR", help="new or empty output directory")
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default="plain",
        help="plain: dense safetensors that stock transformers loads (default); compressed-tensors: the pruned "
        "weights stored sparse (sparse-24-bitmask where every pruned projection holds 2:4, else sparse-bitmask), as "
        "llm-compressor saved them; read back with peft_restorelcc.assets.load_model",
    )
    parser.set_defaults(func=run)


def _adapter_type(adapter: Path) -> str:
    config_file = adapter / "adapter_config.json"
    if not config_file.is_file():
        raise ValueError(
            f"--adapter {adapter} is not an adapter directory (no adapter_config.json): pass the --output of "
            "`restorelcc train` or a directory written by a PEFT model's save_pretrained."
        )
    try:
        return str(json.loads(config_file.read_text())["peft_type"])
    except (ValueError, KeyError) as error:
        raise ValueError(f"{config_file} is not a PEFT adapter config (no peft_type): {error}") from error


def _check_output(output: Path) -> None:
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise ValueError(f"--output {output} exists and is not an empty directory: pass a new or empty directory.")


def _check_bias_switch(model_path: Path) -> None:
    """Refuse, before loading any weights, an architecture whose config cannot carry the merged bias (export.py
    checks again on the model itself, which also covers architectures it does not know)."""
    from transformers import AutoConfig

    from ..export import NO_OUTPUT_BIAS

    config = AutoConfig.from_pretrained(model_path)
    model_type = getattr(config.get_text_config(), "model_type", None)
    if model_type in NO_OUTPUT_BIAS:
        raise ValueError(
            f"Cannot export a merged RestoreLCC model: the {model_type} architecture has no config switch for an "
            "attention output bias, so a stock from_pretrained would silently drop the compensation. Keep the "
            "adapter separate and load it with PeftModel.from_pretrained."
        )


def save_merged_generic(model: Any, output: Path, tokenizer: Any = None, output_format: str = "plain") -> Path:
    """``merge_and_unload()`` + ``save_pretrained`` (or the compressed-tensors writer) for any mergeable PEFT type,
    written to a temporary sibling and renamed into place, so a failure leaves no half-written output."""
    if not hasattr(model, "merge_and_unload"):
        raise ValueError(f"{type(model).__name__} cannot be merged into the weights; keep the adapter separate.")
    try:
        merged = model.merge_and_unload()
    except (AttributeError, NotImplementedError) as error:  # prompt-learning methods have nothing to fold
        raise ValueError(f"This adapter type cannot be merged into the weights ({error}); keep it separate.") from error
    if output_format == "compressed-tensors":
        from ..compressed import save_sparse

        return save_sparse(merged, output, tokenizer=tokenizer)
    with staged_output_dir(output) as staging:
        merged.save_pretrained(staging, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
    return output


def _sparse_format_of(output: Path) -> str | None:
    from ..compressed import sparse_format

    return sparse_format(output)


def run(args: argparse.Namespace) -> int:
    from ..assets import resolve_model_path

    adapter = Path(args.adapter).expanduser()
    output = Path(args.output).expanduser()
    adapter_type = _adapter_type(adapter)
    _check_output(output)
    model_path = resolve_model_path(args.model)
    if adapter_type == "RESTORELCC":
        _check_bias_switch(model_path)

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import peft_restorelcc  # noqa: F401  (registers RESTORELCC with PEFT before the adapter is read)

    from .. import export
    from ..assets import load_model, load_tokenizer
    from ..pruning import measure_sparsity
    from ..tuner.config import PEFT_TYPE

    base = load_model(model_path)
    before = measure_sparsity(base)  # measured before wrapping: adapters replace the projection modules
    try:
        tokenizer = load_tokenizer(model_path)
    except (OSError, ValueError, TypeError) as error:
        print(f"restorelcc merge: warning: no tokenizer saved ({error})", file=sys.stderr)
        tokenizer = None
    model = PeftModel.from_pretrained(base, str(adapter))
    if adapter_type == PEFT_TYPE and args.format == "compressed-tensors":
        from ..compressed import save_merged_sparse

        save_merged_sparse(model, output, tokenizer=tokenizer)
    elif adapter_type == PEFT_TYPE:
        export.save_merged(model, output, tokenizer=tokenizer)
    else:
        save_merged_generic(model, output, tokenizer=tokenizer, output_format=args.format)
    # Measured on what a user gets: the saved model reloaded (by stock transformers for the plain format).
    reloaded = AutoModelForCausalLM.from_pretrained(output) if args.format == "plain" else load_model(output)
    after = measure_sparsity(reloaded)

    unchanged = before["zeros"] == after["zeros"] and before["total"] == after["total"]
    report = {
        "adapter_type": adapter_type,
        "model": str(args.model),
        "adapter": str(adapter),
        "format": args.format,
        "sparsity_before": before["overall_sparsity"],
        "sparsity_after": after["overall_sparsity"],
        "zeros_before": before["zeros"],
        "zeros_after": after["zeros"],
        "sparsity_unchanged": unchanged,
    }
    (output / REPORT_FILE).write_text(json.dumps(report, indent=2))
    rows = [
        ("adapter type", adapter_type),
        ("sparsity before merge", f"{before['overall_sparsity']:.4f} ({before['zeros']:,} zeros)"),
        ("sparsity after merge", f"{after['overall_sparsity']:.4f} ({after['zeros']:,} zeros)"),
        ("sparsity", "unchanged" if unchanged else "CHANGED: the merge filled pruned weights"),
        ("format", args.format if args.format == "plain" else f"compressed-tensors ({_sparse_format_of(output)})"),
        ("output", str(output)),
    ]
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"{label:<{width}}  {value}")
    if adapter_type == PEFT_TYPE and not unchanged:
        # RestoreLCC merges into biases only; a changed weight is a bug, not a property of the method.
        print("restorelcc merge: error: a RestoreLCC merge changed the weights' sparsity.", file=sys.stderr)
        return 1
    return 0
