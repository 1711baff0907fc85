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

from ..io.choices import QUANTIZATIONS
from .options import DTYPES, MODEL_HELP, add_force_argument, add_model_arguments, check_output_dir
from .summary import print_rows

REPORT_FILE = "merge_report.json"
FORMATS = ("plain",)
# Accepted by --format only to say what to do instead.
RETIRED_FORMATS = {
    "compressed-tensors": (
        "--format compressed-tensors is retired: compressed-tensors 0.15, llm-compressor 0.11 and vLLM no longer read "
        "sparse formats (vLLM 0.24+ refuses a sparsity_config). Leave --format out: the default writes plain "
        "safetensors with the zeros stored, which transformers and vLLM load."
    )
}


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
    add_model_arguments(parser, help="the pruned model the adapter was trained on: " + MODEL_HELP)
    parser.add_argument("--adapter", required=True, metavar="DIR", help="trained adapter: local directory or Hub id")
    parser.add_argument(
        "--adapter-revision", default=None, metavar="REV", help="revision of a Hub id given to --adapter"
    )
    add_force_argument(parser)
    parser.add_argument(
        "--dtype", default="auto", choices=DTYPES, help="dtype the model is loaded and merged in (default: its own)"
    )
    parser.add_argument(
        "--quantization",
        default=None,
        choices=QUANTIZATIONS,
        help="load --model quantized by bitsandbytes (as `restorelcc train --quantization` did) and merge into it: "
        "only the attention output biases are written, the saved quantized weights are those of --model quantized "
        "afresh, bit for bit (checked, and reported instead of the sparsity)",
    )
    parser.add_argument("--output", required=True, metavar="DIR", help="new or empty output directory")
    parser.add_argument(
        "--format",
        choices=(*FORMATS, *RETIRED_FORMATS),
        default="plain",
        help="plain (the only one): safetensors with the zeros stored, which transformers and vLLM load",
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


def _check_bias_switch(model_path: Path) -> None:
    """Refuse, before loading any weights, an architecture whose merged bias neither its own config nor the exactly
    equivalent Llama (conversion.py: qwen2, mistral, phi3) can carry, with conversion's one-line reason (export.py
    checks again on the model itself, which also covers architectures it does not know)."""
    from transformers import AutoConfig

    from ..io.conversion import conversion_problem
    from ..io.export import NO_OUTPUT_BIAS

    config = AutoConfig.from_pretrained(model_path)
    model_type = getattr(config.get_text_config(), "model_type", None)
    if model_type in NO_OUTPUT_BIAS:
        problem = conversion_problem(config)
        if problem is not None:
            raise ValueError(f"Cannot export a merged RestoreLCC model of the {model_type} architecture: {problem}.")


def _check_not_merged(model_path: Path) -> None:
    """A model that `restorelcc merge` wrote already holds a compensation: a second merge would add another one."""
    from ..io.export import check_not_merged

    config_file = model_path / "config.json"
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError):
        config = {}  # a missing or unreadable config is transformers' to report when it loads the model
    check_not_merged(config if isinstance(config, dict) else {}, where=f"--model {model_path}")
    if (model_path / "restorelcc_export.json").is_file():
        check_not_merged({"restorelcc_merged": True}, where=f"--model {model_path}")


def save_merged_generic(model: Any, output: Path, tokenizer: Any = None) -> Path:
    """``merge_and_unload()`` + ``save_pretrained`` for any mergeable PEFT type, written to a temporary sibling and
    renamed into place, so a failure leaves no half-written output."""
    from ..io.files import staged_output_dir, state_bytes

    if not hasattr(model, "merge_and_unload"):
        raise ValueError(f"{type(model).__name__} cannot be merged into the weights; keep the adapter separate.")
    try:
        merged = model.merge_and_unload()
    except (AttributeError, NotImplementedError) as error:  # prompt-learning methods have nothing to fold
        raise ValueError(f"This adapter type cannot be merged into the weights ({error}); keep it separate.") from error
    from ..io.export import strip_serving_blockers

    strip_serving_blockers(merged.config)
    with staged_output_dir(output, expected_bytes=state_bytes(merged)) as staging:
        merged.save_pretrained(staging, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
    return output


def _check_args(args: argparse.Namespace) -> tuple[Path, str, Path, Path]:
    """``(adapter dir, adapter type, output, model dir)``, every check done before any weight is read."""
    from ..io import check_adapter_base, resolve_adapter_path, resolve_model_path
    from ..tuner.config import PEFT_TYPE

    if args.format in RETIRED_FORMATS:
        raise ValueError(RETIRED_FORMATS[args.format])
    adapter = resolve_adapter_path(args.adapter, args.adapter_revision)
    adapter_type = _adapter_type(adapter)
    output = Path(args.output).expanduser()
    check_output_dir(output)
    model_path = resolve_model_path(args.model, args.revision)
    check_adapter_base(adapter, model_path, args.model, args.force)
    if args.quantization is not None and adapter_type != PEFT_TYPE:
        raise ValueError(
            f"--quantization merges a RestoreLCC adapter into a bias; a {adapter_type} merge would rewrite the "
            "quantized weights (dequantize, add, requantize): keep that adapter separate or merge into the "
            "unquantized model."
        )
    if adapter_type == PEFT_TYPE:
        _check_not_merged(model_path)
    if _is_packed(model_path):
        _check_packed(args, adapter_type, model_path)
    elif adapter_type == PEFT_TYPE:
        _check_bias_switch(model_path)
    return adapter, adapter_type, output, model_path


def _is_packed(model_path: Path) -> bool:
    from ..io.export import is_compressed_tensors_quantized

    return is_compressed_tensors_quantized(model_path)


def _check_packed(args: argparse.Namespace, adapter_type: str, model_path: Path) -> None:
    """A compressed-tensors quantized --model: only a RestoreLCC adapter, of an architecture with a bias switch."""
    from ..io.export import checkpoint_config, packed_merge_problem
    from ..tuner.config import PEFT_TYPE

    if args.quantization is not None:
        raise ValueError(
            f"--model {args.model} is already quantized by compressed-tensors: leave --quantization out (the merge "
            "writes the adapter's biases beside its packed weights)."
        )
    if adapter_type != PEFT_TYPE:
        raise ValueError(
            f"--model {args.model} is quantized by compressed-tensors: a {adapter_type} merge would rewrite its "
            "packed weights; keep that adapter separate (only RestoreLCC merges into biases beside them)."
        )
    problem = packed_merge_problem(checkpoint_config(model_path).get("model_type"), args.model)
    if problem is not None:
        raise ValueError(problem)


def _run_packed(args: argparse.Namespace, adapter: Path, output: Path, model_path: Path) -> int:
    """Merge into the dequantized --model and write its own packed tensors bit for bit plus the merged biases."""
    import peft_restorelcc  # noqa: F401  (registers RESTORELCC with PEFT before the adapter is read)

    from ..io import export, load_model, load_tokenizer
    from ..io.adapters import load_adapter
    from ..io.checks import check_finite_weights
    from ..tuner.config import PEFT_TYPE

    base = load_model(model_path, dtype=args.dtype, dequantize=True)
    try:
        tokenizer = load_tokenizer(model_path)
    except (OSError, ValueError, TypeError):
        tokenizer = None  # the checkpoint's own tokenizer files are copied as they are
    model = load_adapter(base, adapter)
    check_finite_weights(model, f"--model {args.model} with --adapter {args.adapter}")
    export.save_merged_packed(model, model_path, output, tokenizer=tokenizer)
    written = json.loads((output / "restorelcc_export.json").read_text())["biases"]
    changed = export.changed_checkpoint_tensors(model_path, output, ignore=set(written))
    quantization = export.checkpoint_config(model_path)["quantization_config"]
    compared = sum(1 for name in export.checkpoint_tensor_names(model_path) if name not in written)
    report = {
        "adapter_type": PEFT_TYPE,
        "model": str(args.model),
        "adapter": str(adapter),
        "format": args.format,
        "quantization": "compressed-tensors",
        "quantization_format": quantization.get("format"),
        "checkpoint_tensors": compared,
        "checkpoint_tensors_changed": changed,
        "quantized_weights_unchanged": not changed,
        "biases_written": written,
    }
    (output / REPORT_FILE).write_text(json.dumps(report, indent=2))
    rows = [
        ("adapter type", PEFT_TYPE),
        ("quantization", f"compressed-tensors ({quantization.get('format')}), kept"),
        ("checkpoint tensors", f"{compared}, " + ("packed weights and scales bit-identical to --model" if not changed
                                                 else f"CHANGED: {len(changed)}, e.g. {changed[0]}")),
        ("biases written", f"{len(written)} (attention_bias=True)"),
        ("output", str(output)),
    ]  # fmt: skip
    return _report_rows(rows, changed, "the packed merge changed checkpoint tensors.")



def _merge(
    args: argparse.Namespace, adapter: Path, adapter_type: str, output: Path, model_path: Path
) -> tuple[dict, dict]:
    """Merge and save; returns the sparsity ``(before, after)``, after measured on the saved model reloaded."""
    from transformers import AutoModelForCausalLM

    import peft_restorelcc  # noqa: F401  (registers RESTORELCC with PEFT before the adapter is read)

    from ..io import export, load_model, load_tokenizer
    from ..pruning import measure_sparsity
    from ..tuner.config import PEFT_TYPE

    quantization = getattr(args, "quantization", None)
    base = load_model(model_path, dtype=args.dtype, quantization=quantization)
    # Measured before wrapping: adapters replace the projection modules. A quantized model's zeros are not
    # readable from its packed weights: there the quantized tensors themselves are compared.
    before = export.quantized_tensors(base) if quantization else measure_sparsity(base)
    try:
        tokenizer = load_tokenizer(model_path)
    except (OSError, ValueError, TypeError) as error:
        print(f"restorelcc merge: warning: no tokenizer saved ({error})", file=sys.stderr)
        tokenizer = None
    from ..io.adapters import load_adapter

    model = load_adapter(base, adapter)
    from ..io.checks import check_finite_weights

    check_finite_weights(model, f"--model {args.model} with --adapter {args.adapter}")
    if adapter_type == PEFT_TYPE:
        export.save_merged(model, output, tokenizer=tokenizer)
    else:
        save_merged_generic(model, output, tokenizer=tokenizer)
    # Measured on what a user gets: the saved model reloaded by stock transformers.
    if quantization:
        reloaded = AutoModelForCausalLM.from_pretrained(output, device_map=base.device.type)
        return before, export.quantized_tensors(reloaded)
    reloaded = AutoModelForCausalLM.from_pretrained(output)
    return before, measure_sparsity(reloaded)


def _run_quantized(args: argparse.Namespace, adapter: Path, output: Path, model_path: Path) -> int:
    from ..io.export import changed_quantized_tensors
    from ..tuner.config import PEFT_TYPE

    before, after = _merge(args, adapter, PEFT_TYPE, output, model_path)
    changed = changed_quantized_tensors(before, after)
    report = {
        "adapter_type": PEFT_TYPE,
        "model": str(args.model),
        "adapter": str(adapter),
        "format": args.format,
        "quantization": args.quantization,
        "quantized_tensors": len(before),
        "quantized_tensors_changed": changed,
        "quantized_weights_unchanged": not changed,
    }
    (output / REPORT_FILE).write_text(json.dumps(report, indent=2))
    rows = [
        ("adapter type", PEFT_TYPE),
        ("quantization", args.quantization),
        ("quantized tensors", f"{len(before)}, " + ("bit-identical to --model quantized afresh" if not changed
                                                    else f"CHANGED: {len(changed)}, e.g. {changed[0]}")),
        ("output", str(output)),
    ]  # fmt: skip
    return _report_rows(rows, changed, "a RestoreLCC merge changed quantized weights.")


def _report_rows(rows: list[tuple[str, str]], changed: list, error: str) -> int:
    """Print the merge's summary rows aligned; exit status 1 (with ``error`` on stderr) when a tensor changed."""
    print_rows(rows)
    if changed:
        print(f"restorelcc merge: error: {error}", file=sys.stderr)
        return 1
    return 0


def run(args: argparse.Namespace) -> int:
    adapter, adapter_type, output, model_path = _check_args(args)
    from ..io.checks import json_safe
    from ..tuner.config import PEFT_TYPE

    if _is_packed(model_path):
        return _run_packed(args, adapter, output, model_path)
    if args.quantization is not None:
        return _run_quantized(args, adapter, output, model_path)
    before, after = _merge(args, adapter, adapter_type, output, model_path)
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
    (output / REPORT_FILE).write_text(json.dumps(json_safe(report), indent=2, allow_nan=False))
    rows = [
        ("adapter type", adapter_type),
        ("sparsity before merge", f"{before['overall_sparsity']:.4f} ({before['zeros']:,} zeros)"),
        ("sparsity after merge", f"{after['overall_sparsity']:.4f} ({after['zeros']:,} zeros)"),
        ("sparsity", "unchanged" if unchanged else "CHANGED: the merge filled pruned weights"),
        ("format", args.format),
        ("output", str(output)),
    ]
    print_rows(rows)
    if adapter_type == PEFT_TYPE and not unchanged:
        # RestoreLCC merges into biases only; a changed weight is a bug, not a property of the method.
        print("restorelcc merge: error: a RestoreLCC merge changed the weights' sparsity.", file=sys.stderr)
        return 1
    return 0
