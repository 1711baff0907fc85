"""How the cost of prune, calibrate and train grows with the model: random-weight Llama shapes, bf16.

Every shape is a real model's config (SmolLM2-135M/360M, Llama-3.2-1B/3B, Llama-2-7B) built with
``from_config`` and random weights: nothing is downloaded or carried. The dense model is built once and saved to a
scratch directory; then each stage runs in a fresh subprocess, so the peak RSS it reports (``ru_maxrss`` of that
process) is the stage's own:

* ``prune``: load the dense model, Wanda 50% (``pruning.prune_model``) on random token windows; the pruned model is
  saved for the next stages (saving is not timed).
* ``calibrate``: ``calibration.calibrate`` with both models as loaders (one resident at a time), ``lost_norm``
  scoring, last-token position, N random prompts; the lost components are saved for the next stage.
* ``train``: ``build_restorelcc_model`` on 25% of the heads (``init="lost"``), then ``training.train_adapter`` for
  one epoch of the training samples at batch 8 (one step by default on the CPU); ``seconds`` is the median
  optimizer step. The bytes one step needs beyond the weights (``recovery.training_memory_bytes``) are measured
  after it.

``seconds`` is the wall time of the library call only (``cpu_seconds``: this process's CPU time over it, all
threads; model loading excluded, except in ``calibrate``, where the loaders are part of the call); peak RSS covers
the whole subprocess (interpreter, torch, model). The growth exponent per stage is the slope of a least-squares line
through (log params, log seconds), (log params, log CPU seconds) and (log params, log peak RSS).
``memory_ratio`` = peak RSS / (one model's weights + the stage's activations, see ``activation_bytes``).

    python benchmarks/scaling.py                      # CPU: 135m 360m 1b 3b, writes results/scaling.{json,png}
    python benchmarks/scaling.py --device cuda --shapes 7b --output /tmp/scaling-7b.json   # the GPU check

On CUDA the defaults become the issue's GPU check: 1,000 calibration prompts, one epoch of 2,000 training samples,
and the peak GPU memory is recorded as well. Timings on a shared machine are inflated by the other processes: the
load average before and after each stage is recorded with it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from shapes import SHAPES, llama_config

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
STAGES = ("prune", "calibrate", "train")

CPU_SHAPES = ("135m", "360m", "1b", "3b")


def _token_ids(vocab_size: int, rows: int, length: int, seed: int):
    import torch

    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab_size, (rows, length), generator=generator)


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def _weight_bytes(model) -> int:
    return sum(parameter.numel() * parameter.element_size() for parameter in model.parameters())


# --------------------------------------------------------------------------------------------------- stages
def build_dense(shape: str, work: Path, device: str, seed: int = 0) -> dict[str, Any]:
    """Random weights from the shape's config, bf16, saved to ``work/dense``."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(llama_config(shape), dtype=torch.bfloat16)
    model.save_pretrained(work / "dense")
    return {"params": model.num_parameters(), "weight_bytes": _weight_bytes(model)}


def _load(path: Path, device: str, device_map: str | None):
    import torch

    from peft_restorelcc.io import load_model

    model = load_model(path, dtype=torch.bfloat16, device_map=device_map or {"": device})
    return model


def stage_prune(shape: str, work: Path, device: str, options: dict[str, Any]) -> dict[str, Any]:
    from peft_restorelcc.pruning import prune_model, save_pruned

    model = _load(work / "dense", device, options.get("device_map"))
    config = model.config
    windows = _token_ids(config.vocab_size, options["prune_samples"], options["seq_len"], seed=1)
    started, cpu_started = time.perf_counter(), time.process_time()
    report = prune_model(model, "wanda", 0.5, calibration_input_ids=windows, batch_size=8, progress=False)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    save_pruned(model, None, work / "pruned", {key: report[key] for key in ("method", "sparsity_target")})
    hidden_bytes = options["prune_samples"] * options["seq_len"] * config.hidden_size * 2
    return {
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "overall_sparsity": report["overall_sparsity"],
        # The block inputs of every calibration sample are kept while a block is pruned (and its outputs formed).
        "activation_bytes": 2 * hidden_bytes,
        "weight_bytes": _weight_bytes(model),
    }


def stage_calibrate(shape: str, work: Path, device: str, options: dict[str, Any]) -> dict[str, Any]:
    from transformers import AutoConfig

    from peft_restorelcc import pipeline
    from peft_restorelcc.calibration import CalibrationInputs, ModelLoader

    config = AutoConfig.from_pretrained(work / "dense")
    loads: list[float] = []

    def loader(name: str) -> ModelLoader:
        def load():
            started = time.perf_counter()
            model = _load(work / name, device, options.get("device_map"))
            loads.append(time.perf_counter() - started)
            return model

        return ModelLoader(load, config=config, name=name)

    prompts = _token_ids(config.vocab_size, options["calibration_samples"], options["seq_len"], seed=2)
    started, cpu_started = time.perf_counter(), time.process_time()
    # Random token ids stand for prompts: the cost depends on the shapes, not on the text.
    inputs = CalibrationInputs(prompts, None, "random token ids", None, None)
    components = pipeline.calibrate(
        loader("dense"),
        loader("pruned"),
        None,
        inputs,
        strategy="lost_norm",
        position="last",
        batch_size=options["batch_size"],
        max_length=None,
        progress=False,
    )
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    components.save(work / "components")
    heads = sum(components.heads_per_layer)
    d = components.head_dim
    batch_tokens = options["batch_size"] * options["seq_len"]
    # One batch's forward (the MLP's three intermediate tensors dominate) and the kept last-token rows of both
    # models (fp32).
    forward = batch_tokens * (3 * config.intermediate_size + 4 * config.hidden_size) * 2
    rows = 2 * options["calibration_samples"] * heads * d * 4
    return {
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "model_load_seconds": sum(loads),
        "activation_bytes": forward + rows,
        "weight_bytes": None,  # filled from the dense build
    }


def stage_train(shape: str, work: Path, device: str, options: dict[str, Any]) -> dict[str, Any]:
    import torch

    from peft_restorelcc import pipeline
    from peft_restorelcc.calibration import LostComponents
    from peft_restorelcc.evaluation.statistics import training_memory_bytes
    from peft_restorelcc.training.trainer import PaddingCollator

    model = _load(work / "pruned", device, options.get("device_map"))
    weight_bytes = _weight_bytes(model)
    components = LostComponents.load(work / "components")
    peft_model = pipeline.build_adapter(model, components, 0.25, init="lost")
    ids = _token_ids(model.config.vocab_size, options["train_samples"], options["seq_len"], seed=3)
    dataset = [{"input_ids": row.tolist(), "labels": row.tolist()} for row in ids]
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    metrics = pipeline.train(
        peft_model,
        None,
        dataset,
        work / "adapter",
        epochs=1,
        batch_size=8,
        save_steps=10**9,
        logging_steps=10**9,
        disable_tqdm=True,
        device=device,
    )
    step_bytes = training_memory_bytes(peft_model, PaddingCollator(0)(dataset[:8]))
    return {
        "seconds": metrics["seconds_per_step"],
        "cpu_seconds": metrics["cpu_seconds_per_step"],
        "train_seconds": metrics["seconds"],
        "steps": metrics["steps"],
        "train_loss": metrics["train_loss"],
        "trainable_parameters": metrics["trainable_parameters"],
        "activation_bytes": step_bytes,
        "weight_bytes": weight_bytes,
    }


STAGE_FUNCTIONS = {"prune": stage_prune, "calibrate": stage_calibrate, "train": stage_train}


def run_in_child(stage: str, shape: str, work: Path, device: str, options: dict[str, Any]) -> dict[str, Any]:
    """This script in a fresh interpreter for one (shape, stage); its result comes back as JSON in a file."""
    result_file = work / f"{stage}.result.json"
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child-stage",
        stage,
        "--shapes",
        shape,
        "--device",
        device,
        "--work-dir",
        str(work),
        "--child-options",
        json.dumps(options),
    ]
    load_before = os.getloadavg()
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode != 0:
        raise RuntimeError(f"{shape}/{stage} failed ({completed.returncode}):\n{completed.stderr[-4000:]}")
    result = json.loads(result_file.read_text())
    result["load_average_before"] = [round(value, 2) for value in load_before]
    result["load_average_after"] = [round(value, 2) for value in os.getloadavg()]
    return result


def _current_rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def child_main(stage: str, shape: str, work: Path, device: str, options: dict[str, Any]) -> None:
    import torch
    import transformers  # noqa: F401  (imported before the baseline so that it counts as runtime, not stage)

    import peft_restorelcc.calibration  # noqa: F401

    if options.get("threads"):
        torch.set_num_threads(options["threads"])
    # The interpreter with torch, transformers and the library loaded: what any stage pays before its model.
    baseline = _current_rss_bytes()
    result = STAGE_FUNCTIONS[stage](shape, work, device, options)
    result["peak_rss_bytes"] = _peak_rss_bytes()
    result["runtime_rss_bytes"] = baseline
    if device == "cuda":
        result["peak_cuda_bytes"] = torch.cuda.max_memory_allocated()
    (work / f"{stage}.result.json").write_text(json.dumps(result))


# --------------------------------------------------------------------------------------------------- analysis
def growth_exponent(params: list[float], values: list[float]) -> float | None:
    """Slope of the least-squares line through (log params, log value); None with fewer than two shapes."""
    points = [(math.log(p), math.log(v)) for p, v in zip(params, values) if p and v and v > 0]
    if len({x for x, _ in points}) < 2:
        return None
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    covariance = sum((x - mean_x) * (y - mean_y) for x, y in points)
    variance = sum((x - mean_x) ** 2 for x, _ in points)
    return covariance / variance


def exponents(rows: list[dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    fitted = {}
    for stage in STAGES:
        mine = [row for row in rows if row["stage"] == stage]
        params = [row["params"] for row in mine]
        fitted[stage] = {
            "seconds": growth_exponent(params, [row["seconds"] for row in mine]),
            # CPU time of the process (all its threads): less sensitive than wall time to other processes' load.
            "cpu_seconds": growth_exponent(params, [row["cpu_seconds"] for row in mine]),
            "peak_rss_bytes": growth_exponent(params, [row["peak_rss_bytes"] for row in mine]),
            "shapes": [row["shape"] for row in mine],
        }
    return fitted


def machine() -> dict[str, Any]:
    import torch

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_default_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def plot(document: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for axis, key, label in ((axes[0], "seconds", "seconds"), (axes[1], "peak_rss_bytes", "peak RSS (GiB)")):
        for stage in STAGES:
            mine = [row for row in document["rows"] if row["stage"] == stage]
            if not mine:
                continue
            scale = 2**30 if key == "peak_rss_bytes" else 1
            exponent = document["exponent"][stage][key]
            legend = stage if exponent is None else f"{stage} (slope {exponent:.2f})"
            line = axis.plot(
                [row["params"] for row in mine], [row[key] / scale for row in mine], marker="o", label=legend
            )
            if key == "seconds":
                axis.plot(
                    [row["params"] for row in mine],
                    [row["cpu_seconds"] for row in mine],
                    ":",
                    marker=".",
                    color=line[0].get_color(),
                    label=f"{stage} CPU seconds (slope {document['exponent'][stage]['cpu_seconds'] or float('nan'):.2f})",
                )
        if key == "peak_rss_bytes":
            weights = sorted({(row["params"], row["weight_bytes"]) for row in document["rows"] if row["weight_bytes"]})
            axis.plot([p for p, _ in weights], [w / 2**30 for _, w in weights], "k--", label="bf16 weights")
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel("parameters")
        axis.set_ylabel(label)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(f"RestoreLCC cost vs model size ({document['device']}, bf16, random-weight Llama shapes)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write(document: dict[str, Any], output: Path) -> None:
    document["exponent"] = exponents(document["rows"])
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(document, indent=2) + "\n")
    try:
        plot(document, output.with_suffix(".png"))
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'): no plot written", file=sys.stderr)


# --------------------------------------------------------------------------------------------------- driver
def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=None, choices=sorted(set(SHAPES) - {"serving"}),
                        help="default: 135m 360m 1b 3b")  # fmt: skip
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--device-map", default=None, help="passed to from_pretrained (e.g. auto); default the device")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--prune-samples", type=int, default=None, help="Wanda windows (cpu 64, cuda 128)")
    parser.add_argument("--calibration-samples", type=int, default=None, help="cpu 64, cuda 1000")
    parser.add_argument("--train-samples", type=int, default=None, help="one epoch at batch 8 (cpu 8, cuda 2000)")
    parser.add_argument("--batch-size", type=int, default=8, help="calibration batch size")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads per stage (default torch's; 1 on a contended CPU)"
    )
    parser.add_argument("--work-dir", type=Path, default=None, help="scratch directory (default: a temporary one)")
    parser.add_argument("--output", type=Path, default=RESULTS / "scaling.json")
    parser.add_argument("--child-stage", choices=STAGES, help=argparse.SUPPRESS)
    parser.add_argument("--child-options", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child_stage:
        child_main(args.child_stage, args.shapes[0], args.work_dir, args.device, json.loads(args.child_options))
        return None

    gpu = args.device == "cuda"
    options = {
        "seq_len": args.seq_len,
        "prune_samples": args.prune_samples or (128 if gpu else 64),
        "calibration_samples": args.calibration_samples or (1000 if gpu else 64),
        "train_samples": args.train_samples or (2000 if gpu else 8),
        "batch_size": args.batch_size,
        "device_map": args.device_map,
        "threads": args.threads,
    }
    shapes = args.shapes or list(CPU_SHAPES)
    document: dict[str, Any] = {
        "command": "python benchmarks/scaling.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "device": args.device,
        "dtype": "bfloat16",
        "options": options,
        "machine": machine(),
        "load_average_start": [round(value, 2) for value in os.getloadavg()],
        "note": "Shared machine: other processes compete for the cores, so the seconds are inflated (see the "
        "load averages); peak RSS is each stage's own subprocess.",
        "rows": [],
    }
    root = args.work_dir or Path(tempfile.mkdtemp(prefix="restorelcc-scaling-"))
    run_started = time.perf_counter()
    try:
        for shape in shapes:
            work = root / shape
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            started = time.perf_counter()
            built = run_build(shape, work, args.device)
            print(f"{shape}: {built['params'] / 1e6:.1f}M params built in {time.perf_counter() - started:.0f} s")
            for stage in STAGES:
                result = run_in_child(stage, shape, work, args.device, options)
                row = {
                    "shape": shape,
                    "model": SHAPES[shape]["model"],
                    "params": built["params"],
                    "stage": stage,
                    **result,
                }
                row["weight_bytes"] = row.get("weight_bytes") or built["weight_bytes"]
                expected = row["weight_bytes"] + row["activation_bytes"]
                row["memory_ratio"] = row["peak_rss_bytes"] / expected
                # Without the interpreter, torch and transformers themselves (about 0.4-0.5 GiB whatever the model).
                row["memory_ratio_above_runtime"] = (row["peak_rss_bytes"] - row["runtime_rss_bytes"]) / expected
                if "peak_cuda_bytes" in row:  # on a GPU the weights and activations live in its memory, not in RSS
                    row["cuda_memory_ratio"] = row["peak_cuda_bytes"] / expected
                document["rows"].append(row)
                print(
                    f"{shape:>5} {stage:<9} {row['seconds']:9.2f} s ({row['cpu_seconds']:.1f} CPU s)  peak RSS {row['peak_rss_bytes'] / 2**30:6.2f} GiB"
                    f"  ({row['memory_ratio_above_runtime']:.2f}x weights+activations above runtime)  load {row['load_average_after'][0]}",
                    flush=True,
                )
                # Everything since the start, model building, saving and loading included (the GPU check's budget).
                document["total_seconds"] = round(time.perf_counter() - run_started, 1)
                write(document, args.output)  # after every row: a long run that stops keeps what finished
            shutil.rmtree(work, ignore_errors=True)
    finally:
        if args.work_dir is None:
            shutil.rmtree(root, ignore_errors=True)
    for stage, fitted in document["exponent"].items():
        if fitted["seconds"] is not None:
            print(
                f"{stage}: seconds ~ params^{fitted['seconds']:.2f}, peak RSS ~ params^{fitted['peak_rss_bytes']:.2f}"
            )
    print(f"total {document.get('total_seconds', 0):.0f} s; wrote {args.output}")
    return document


def run_build(shape: str, work: Path, device: str) -> dict[str, Any]:
    """The dense model in its own process too, so that no stage inherits its memory."""
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); import scaling; "
        "print(json.dumps(scaling.build_dense(sys.argv[2], scaling.Path(sys.argv[3]), sys.argv[4])))"
    )
    completed = subprocess.run(
        [sys.executable, "-c", code, str(HERE), shape, str(work), device], capture_output=True, text=True
    )
    if completed.returncode != 0:
        raise RuntimeError(f"building {shape} failed:\n{completed.stderr[-4000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
