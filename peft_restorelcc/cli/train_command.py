"""``restorelcc train``: recovery training of an existing adapter on a pruned model (optionally distilling from the
dense model), with the Hugging Face Trainer.

Runs as one process, or data-parallel under ``torchrun --nproc_per_node N -m peft_restorelcc train ...`` (or
``accelerate launch``): ``--batch-size`` is per process, and only the main process writes the output.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

from ..data.choices import EVAL_TASKS, SCORED_ITEMS, TRAINING_HELP
from ..io.choices import QUANTIZATIONS
from ..training.choices import (
    DATA_CHOICES,
    DEFAULT_DATA,
    PAPER_BATCH_SIZE,
    PAPER_EPOCHS,
    PAPER_LEARNING_RATE,
    PAPER_SAMPLES,
)
from .options import MODEL_HELP, add_common_arguments, add_force_argument, add_model_arguments, check_output_dir
from .summary import print_rows

METRICS_FILE = "train_metrics.json"

DESCRIPTION = f"""\
Train the adapter in --adapter (e.g. written by `restorelcc calibrate`; any PEFT adapter works, LoRA included) on
the pruned model --model, and write the trained adapter (load it with `import peft_restorelcc` and
PeftModel.from_pretrained) and {METRICS_FILE} to --output. Checkpoints go to --output/checkpoint-<step>;
--resume continues the latest (or the given) one.

Loss: next-token cross entropy on the response only (--data instruction-and-cloze, the default: the recipe's
question -> answer pairs with options and PIQA's and SciQ's with none shown; instruction, the recipe's pairs alone;
instruction-wide, PIQA and SciQ with options too; task:NAME, one evaluation task's training-side items; your file's
prompt/response, Alpaca instruction/input/output or chat messages rows) or on every token (--data text, or your
file's text rows).
With --distill-from DENSE: A * KL(dense || student) + (1 - A) * LM on the same positions (A = --distill-alpha).

Defaults follow the paper: lr {PAPER_LEARNING_RATE:g}, {PAPER_EPOCHS} epochs, batch {PAPER_BATCH_SIZE}, {PAPER_SAMPLES} samples
(750 optimizer steps). Sequences are cut at --seq-len 128 tokens (the recipe's pairs are shorter than 100 tokens;
nine of PIQA's 1,674 answers are longer and lose their end). On a busy shared CPU --threads 1 is usually fastest;
for a quick run lower --samples or pass --max-steps.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train an adapter on a pruned model (response-only SFT, optional distillation from the dense model)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    parser.set_defaults(func=run)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, help="the pruned model to train the adapter on: " + MODEL_HELP)
    parser.add_argument("--adapter", required=True, metavar="DIR", help="adapter to train: local directory or Hub id")
    parser.add_argument(
        "--adapter-revision", default=None, metavar="REV", help="revision of a Hub id given to --adapter"
    )
    add_force_argument(parser)
    parser.add_argument("--output", required=True, metavar="DIR", help="new or empty directory (or the one resumed)")
    parser.add_argument(
        "--data",
        default=DEFAULT_DATA,
        metavar="SOURCE",
        help=f"one of {', '.join(DATA_CHOICES)}; task:NAME (an evaluation task's items after the first "
        f"{SCORED_ITEMS}, which evaluation scores: {', '.join(EVAL_TASKS)}); or your file (.jsonl, .json, .csv or a "
        f"datasets.save_to_disk directory), or a Hub dataset id org/name[:split] (split train by default; an "
        f"existing local path wins), with {TRAINING_HELP} (default: {DEFAULT_DATA})",
    )
    parser.add_argument("--samples", type=int, default=PAPER_SAMPLES, metavar="N", help="training sequences")
    parser.add_argument("--epochs", type=float, default=PAPER_EPOCHS, metavar="E", help="passes over the data")
    parser.add_argument(
        "--lr",
        type=float,
        default=PAPER_LEARNING_RATE,
        metavar="LR",
        help="peak learning rate (default: the paper's %(default)g; on SmolLM2-135M over 750 steps, 3e-4 gave the same"
        " accuracy at lower held-out perplexity, see the README)",
    )
    parser.add_argument(
        "--max-steps", type=int, default=-1, metavar="N", help="optimizer steps; overrides --epochs (default: -1)"
    )
    parser.add_argument("--batch-size", type=int, default=PAPER_BATCH_SIZE, metavar="B", help="sequences per process")
    parser.add_argument("--grad-accum", type=int, default=1, metavar="G", help="gradient accumulation steps")
    parser.add_argument("--seq-len", type=int, default=128, metavar="L", help="maximum tokens per sequence")
    _add_run_arguments(parser)


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Distillation, resuming, devices and bookkeeping."""
    parser.add_argument("--distill-from", default=None, metavar="DENSE", help="dense model to distil from")
    parser.add_argument(
        "--distill-alpha", type=float, default=None, metavar="A", help="weight of the KL term in [0, 1] (default 1)"
    )
    parser.add_argument(
        "--temperature", type=float, default=None, metavar="T", help="distillation temperature > 0 (default 1)"
    )
    parser.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        metavar="CHECKPOINT",
        help="continue from the latest checkpoint in --output, or from CHECKPOINT (a checkpoint-<step> directory "
        "that `restorelcc train` wrote in --output: it holds restorelcc_checkpoint.json)",
    )
    parser.add_argument(
        "--no-shuffle",
        action="store_true",
        help="feed the data in order (then N processes x batch B see the same global batches as 1 process x N*B)",
    )
    add_common_arguments(
        parser,
        device_help="cpu to train on the CPU where a GPU is present (default: the Trainer's choice, the GPU if any; "
        "under torchrun/accelerate launch each process takes its own)",
    )
    parser.add_argument(
        "--quantization",
        default=None,
        choices=QUANTIZATIONS,
        help="load --model quantized by bitsandbytes and train on it, QLoRA-style: int8 (LLM.int8), nf4 or fp4 "
        "(4-bit, computing in --dtype, default bfloat16 on a GPU and float32 on the CPU), -double also quantizes the "
        "4-bit scales (needs pip install 'peft_restorelcc[quantized]'). `restorelcc merge` of the result writes "
        "only the output projections' biases; the quantized weights stay bit for bit",
    )
    parser.add_argument("--save-steps", type=int, default=50, metavar="N", help="checkpoint every N steps")
    parser.add_argument("--logging-steps", type=int, default=10, metavar="N", help="log the loss every N steps")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="CPU threads per process (default: torch's choice); 1 is fastest on a busy shared machine",
    )


def _text_config(config: Any) -> Any:
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _check_numbers(args: argparse.Namespace) -> None:
    problems = []
    if not (math.isfinite(args.lr) and args.lr > 0):
        problems.append(f"--lr {args.lr} must be a positive number (the paper uses {PAPER_LEARNING_RATE:g})")
    if not (math.isfinite(args.epochs) and args.epochs > 0):
        problems.append(f"--epochs {args.epochs} must be > 0")
    if args.max_steps == 0 or args.max_steps < -1:
        problems.append(f"--max-steps {args.max_steps} must be a positive number of steps (or -1: train --epochs)")
    for flag, value, minimum in (
        ("--samples", args.samples, 1),
        ("--batch-size", args.batch_size, 1),
        ("--grad-accum", args.grad_accum, 1),
        ("--seq-len", args.seq_len, 2),
        ("--save-steps", args.save_steps, 1),
        ("--logging-steps", args.logging_steps, 1),
        ("--threads", 1 if args.threads is None else args.threads, 1),
    ):
        if value < minimum:
            problems.append(f"{flag} {value} must be >= {minimum}")
    if args.distill_from is None and (args.distill_alpha is not None or args.temperature is not None):
        problems.append("--distill-alpha/--temperature need --distill-from DENSE (the model to distil from)")
    if args.distill_alpha is not None and not 0.0 <= args.distill_alpha <= 1.0:
        problems.append(f"--distill-alpha {args.distill_alpha} must be in [0, 1] (1: KL only, 0: LM loss only)")
    if args.temperature is not None and not (math.isfinite(args.temperature) and args.temperature > 0):
        problems.append(f"--temperature {args.temperature} must be > 0 (1 keeps the distributions as they are)")
    if args.device is not None:
        from ..io.devices import default_device

        try:
            default_device(args.device)
        except ValueError as error:
            problems.append(str(error).rstrip("."))
    if problems:
        raise ValueError("; ".join(problems) + ".")


def _resolve_resume(args: argparse.Namespace, output: Path) -> str | None:
    """The checkpoint to resume, checked; None for a fresh run (which needs an empty --output)."""
    from transformers.trainer_utils import get_last_checkpoint

    if args.resume is None:
        check_output_dir(output, hint=", or add --resume to continue the training whose checkpoints are in it")
        return None
    if args.resume is True:
        last = get_last_checkpoint(str(output)) if output.is_dir() else None
        if last is None:
            raise ValueError(
                f"--resume: {output} holds no checkpoint-<step> directory to continue; drop --resume for a fresh run "
                "or pass --resume CHECKPOINT."
            )
        return _check_own_checkpoint(Path(last), output)
    checkpoint = Path(args.resume).expanduser()
    if not (checkpoint / "trainer_state.json").is_file():
        raise ValueError(
            f"--resume {checkpoint} is not a Trainer checkpoint (no trainer_state.json): pass a checkpoint-<step> "
            "directory, or --resume alone for the latest one in --output."
        )
    return _check_own_checkpoint(checkpoint, output)


def _check_own_checkpoint(checkpoint: Path, output: Path) -> str:
    """Resume only a checkpoint this tool wrote (its marker file) inside --output: training writes into --output,
    so anything else (an adapter or model the user passed in, another tool's run) would be overwritten."""
    from ..training.trainer import CHECKPOINT_MARKER

    if not (checkpoint / CHECKPOINT_MARKER).is_file():
        raise ValueError(
            f"--resume {checkpoint} was not written by `restorelcc train` (no {CHECKPOINT_MARKER}): resume only "
            "a checkpoint-<step> directory of an earlier `restorelcc train --output`, or drop --resume for a fresh "
            "run into a new directory."
        )
    if checkpoint.resolve().parent != output.resolve():
        raise ValueError(
            f"--resume {checkpoint} is not a checkpoint of --output {output}: resuming writes into --output, so pass "
            f"--output {checkpoint.resolve().parent} (where it was written)."
        )
    return str(checkpoint)


def _check_output_is_not_an_input(output: Path, inputs: dict[str, Path | None]) -> None:
    """--output must not be (nor contain, nor lie inside) a directory the run reads: training would overwrite it."""
    target = output.expanduser().resolve()
    for flag, path in inputs.items():
        if path is None:
            continue
        source = Path(path).expanduser().resolve()
        if target == source or source in target.parents or target in source.parents:
            raise ValueError(
                f"--output {output} overlaps {flag} {path}: training would overwrite what it reads. Pass a new "
                "directory to --output."
            )


def _check_teacher(student_path: Path, teacher_path: Path) -> None:
    """Distillation compares next-token distributions: both models must share the vocabulary."""
    from transformers import AutoConfig, AutoTokenizer

    student_vocab = _text_config(AutoConfig.from_pretrained(student_path)).vocab_size
    teacher_vocab = _text_config(AutoConfig.from_pretrained(teacher_path)).vocab_size
    if student_vocab != teacher_vocab:
        raise ValueError(
            f"--distill-from {teacher_path} has a vocabulary of {teacher_vocab} tokens but --model has "
            f"{student_vocab}: distil from the dense model the pruned one was made from."
        )
    try:
        student_tokens = AutoTokenizer.from_pretrained(student_path).get_vocab()
        teacher_tokens = AutoTokenizer.from_pretrained(teacher_path).get_vocab()
    except (OSError, ValueError, TypeError):
        return  # one side has no tokenizer saved: the sizes agree, which is all that can be checked
    if student_tokens != teacher_tokens:
        raise ValueError(
            f"--distill-from {teacher_path} has the same vocabulary size as --model but other tokens: distil from "
            "the dense model the pruned one was made from."
        )


def _check_seq_len(model_path: Path, seq_len: int) -> None:
    from transformers import AutoConfig

    config = _text_config(AutoConfig.from_pretrained(model_path))
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if isinstance(limit, int) and seq_len > limit:
        raise ValueError(f"--seq-len {seq_len} exceeds the model's {limit} positions: lower it.")


def _check_args(args: argparse.Namespace) -> tuple[Path, Path | None, Path, str | None, Path]:
    """Every check that needs no model weights. Returns (model path, teacher path, output, checkpoint, adapter)."""
    _check_numbers(args)
    from ..io import check_adapter_base, resolve_adapter_path, resolve_model_path  # torch: after the flags are checked
    from ..io.files import check_not_locked
    from ..training.trainer import check_data_source

    adapter = resolve_adapter_path(args.adapter, args.adapter_revision)
    output = Path(args.output).expanduser()
    model_path = resolve_model_path(args.model, args.revision)
    check_adapter_base(adapter, model_path, args.model, args.force)
    inputs = {"--model": model_path, "--adapter": adapter}
    if args.distill_from is not None:
        inputs["--distill-from"] = resolve_model_path(args.distill_from)
    if Path(args.data).expanduser().exists():
        inputs["--data"] = Path(args.data)
    _check_output_is_not_an_input(output, inputs)
    from ..training.trainer import is_main_process

    if is_main_process():  # under torchrun rank 0 holds the lock; the other ranks write nothing
        check_not_locked(output)
    checkpoint = _resolve_resume(args, output)
    check_data_source(args.data)  # a Hub dataset is read here, before any weights load
    _check_seq_len(model_path, args.seq_len)
    teacher_path = None
    if args.distill_from is not None:
        teacher_path = resolve_model_path(args.distill_from)
        _check_teacher(model_path, teacher_path)
    return model_path, teacher_path, output, checkpoint, adapter


def _load(args: argparse.Namespace, model_path: Path, teacher_path: Path | None, adapter: Path) -> tuple[Any, ...]:
    """``(tokenizer, dataset, PeftModel ready to train, teacher or None)``."""

    import peft_restorelcc  # noqa: F401  (registers RESTORELCC with PEFT before the adapter is read)

    from .. import pipeline
    from ..io import load_model, load_tokenizer

    try:
        tokenizer = load_tokenizer(model_path)
    except (OSError, ValueError, TypeError) as error:
        raise ValueError(
            f"cannot load a tokenizer from --model {args.model} ({error}); training needs one. `restorelcc prune` "
            "saves it next to the pruned model; otherwise copy the dense model's tokenizer files there."
        ) from error
    dataset = pipeline.training_data(args.data, tokenizer, samples=args.samples, seq_len=args.seq_len, seed=args.seed)
    if args.quantization is None:
        from ..io.export import is_compressed_tensors_quantized

        if is_compressed_tensors_quantized(model_path):
            print(
                f"--model {args.model} is quantized by compressed-tensors (llm-compressor): loading it dequantized "
                "(CompressedTensorsConfig(dequantize=True)); `restorelcc merge` writes the adapter back beside its "
                "packed weights",
                file=sys.stderr,
            )
        base = load_model(model_path, dtype=args.dtype, dequantize=True)
    else:
        from peft import prepare_model_for_kbit_training

        base = load_model(model_path, dtype=args.dtype, device_map=args.device, quantization=args.quantization)
        # PEFT's k-bit preparation: every base parameter frozen, non-quantized ones (norms, embeddings) in fp32.
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    from ..io import model_reference, record_base
    from ..io.adapters import load_adapter
    from ..io.checks import check_finite_weights

    model = load_adapter(base, adapter, is_trainable=True)
    record_base(model, model_reference(args.model, model_path), args.revision, local_dir=model_path)  # its base now
    check_finite_weights(model, f"--model {args.model} with --adapter {args.adapter}")
    teacher = load_model(teacher_path, dtype=args.dtype) if teacher_path is not None else None
    return tokenizer, dataset, model, teacher


def _announce(args: argparse.Namespace, model: Any, dataset: Any, teacher: Any) -> None:
    from peft import PeftType

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    adapter_type = PeftType(model.peft_config[model.active_adapter].peft_type).value
    print(
        f"training {adapter_type} adapter: {trainable:,} trainable parameters, {len(dataset)} sequences of "
        f"--data {args.data}" + (f", distilling from {args.distill_from}" if teacher is not None else ""),
        file=sys.stderr,
    )


def run(args: argparse.Namespace) -> int:
    from contextlib import nullcontext

    model_path, teacher_path, output, checkpoint, adapter = _check_args(args)
    from ..io.files import output_lock
    from ..training.trainer import is_main_process

    main = is_main_process()
    # One writer per --output: a second `restorelcc train` into it fails at once (only rank 0 holds the lock).
    with output_lock(output) if main else nullcontext():
        return _train(args, model_path, teacher_path, output, checkpoint, adapter, main)


def _train(
    args: argparse.Namespace, model_path: Path, teacher_path: Path | None, output: Path, checkpoint: str | None,
    adapter: Path, main: bool,
) -> int:  # fmt: skip
    from .. import pipeline
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    tokenizer, dataset, model, teacher = _load(args, model_path, teacher_path, adapter)
    if main:
        _announce(args, model, dataset, teacher)
    distill = {}
    if teacher is not None:
        distill = {
            "distill_alpha": 1.0 if args.distill_alpha is None else args.distill_alpha,
            "temperature": 1.0 if args.temperature is None else args.temperature,
        }
    metrics = pipeline.train(
        model, tokenizer, dataset, output, epochs=args.epochs, learning_rate=args.lr, batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum, max_steps=args.max_steps, seed=args.seed, teacher=teacher,
        resume_from_checkpoint=checkpoint, save_steps=args.save_steps, logging_steps=args.logging_steps,
        shuffle=not args.no_shuffle, device=args.device, **distill,
    )  # fmt: skip
    if not main:
        return 0
    _report(args, metrics, output, checkpoint)
    return 0


def _report(args: argparse.Namespace, metrics: dict[str, Any], output: Path, checkpoint: str | None) -> None:
    metrics.update(
        model=str(args.model),
        adapter=str(args.adapter),
        data=args.data,
        samples=args.samples,
        seq_len=args.seq_len,
        seed=args.seed,
        shuffle=not args.no_shuffle,
        distill_from=args.distill_from,
        resumed_from=checkpoint,
        quantization=args.quantization,
    )
    from ..io.checks import write_json_atomic

    write_json_atomic(output / METRICS_FILE, metrics)
    rows = [
        ("steps", str(metrics["steps"])),
        ("seconds", f"{metrics['seconds']:.1f}"),
        ("seconds / step", str(metrics["seconds_per_step"])),
        ("final loss", f"{metrics['final_loss']:.4f}"),
        ("output", str(output)),
    ]
    print_rows(rows)


def main(argv: list[str] | None = None) -> int:
    """This subcommand alone, with the dispatcher's error handling (``python -m peft_restorelcc.cli.train_command``)."""
    parser = argparse.ArgumentParser(
        prog="restorelcc train", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except ValueError as error:
        print(f"restorelcc train: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
