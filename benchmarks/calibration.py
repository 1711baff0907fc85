"""Time and memory of calibration on SmolLM2-135M: the dense model against a 50% magnitude-pruned copy.

Before and after the paper's counts became the default of `restorelcc calibrate`:

    python benchmarks/calibration.py --samples 128 --strategy probe --pairs 256 --negatives random --threads 1
    python benchmarks/calibration.py --samples 1000 --strategy probe --pairs 1000 --negatives sentence-encoder \
        --threads 1
    python benchmarks/calibration.py --negatives-only 1000 --negatives jaccard sentence-encoder --threads 1

The last one times choosing the 1,000 pairs' wrong answers alone (no model): jaccard against the paper's sentence
encoder. Each run is added to the output file's "runs" (one with the same command replaced).

The pruned copy zeroes the smallest half of every row of every projection in the decoder blocks (embeddings and
lm_head stay dense), in memory. Each configuration runs in a fresh subprocess so that the peak RSS is its own.
Forward time is measured by hooks around the decoder's forward (the capture hooks included); "other" is the rest
of ``calibrate``: tokenization, batching, accumulation, SVD, fingerprint, probe training.

    python benchmarks/calibration.py [--samples 128 512] [--strategy lost_norm] [--position last] [--pairs 128]
        [--negatives random] [--batch-size 8] [--max-length 256] [--threads N]
        [--output benchmarks/results/calibration.json]

Target: the forward passes dominate; everything else stays under 20% of the time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path


def _rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class _RssSampler(threading.Thread):
    """The peak RSS during a span (ru_maxrss would include the model loading before it)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = _rss_mib()
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(0.05):
            self.peak = max(self.peak, _rss_mib())

    def stop(self) -> float:
        self._stop_event.set()
        self.join()
        return max(self.peak, _rss_mib())


def time_negatives(pairs: int, negatives: str) -> dict:
    """Seconds to draw ``pairs`` probe pairs from the bundled data with ``negatives`` choosing the wrong answers."""
    import torch

    from peft_restorelcc.data import contrastive_pairs

    contrastive_pairs(2, negatives="jaccard")  # the data loaded and split once, outside the timing
    begin = time.perf_counter()
    drawn = contrastive_pairs(pairs, seed=0, negatives=negatives)
    return {
        "negatives_only": True,
        "pairs": len(drawn),
        "negatives": negatives,
        "threads": torch.get_num_threads(),
        "seconds": round(time.perf_counter() - begin, 2),
    }


def one_run(
    samples: int, strategy: str, position: str, pairs: int, batch_size: int, max_length: int, negatives: str = "random"
) -> dict:
    import torch

    from peft_restorelcc.calibration import calibrate
    from peft_restorelcc.calibration.capture import _backbone
    from peft_restorelcc.data import calibration_prompts, contrastive_pairs
    from peft_restorelcc.io import load_model, load_tokenizer

    torch.manual_seed(0)
    tokenizer = load_tokenizer("smollm2-135m")
    dense = load_model("smollm2-135m")
    pruned = load_model("smollm2-135m")
    with torch.no_grad():
        for name, module in pruned.named_modules():
            if isinstance(module, torch.nn.Linear) and ".layers." in name:
                weight = module.weight
                k = weight.shape[1] // 2
                threshold = weight.abs().kthvalue(k, dim=1, keepdim=True).values
                weight.mul_(weight.abs() > threshold)
    prompts = calibration_prompts(samples, seed=0)
    pairs_begin = time.perf_counter()
    probe_pairs = contrastive_pairs(limit=pairs, seed=0, negatives=negatives) if strategy == "probe" else None
    pairs_seconds = time.perf_counter() - pairs_begin
    tokens = [len(tokenizer(p)["input_ids"]) for p in prompts]

    forward_seconds = [0.0]
    forward_calls = [0]
    started: list[float] = []
    for model in (dense, pruned):
        backbone = _backbone(model)
        backbone.register_forward_pre_hook(lambda *_: started.append(time.perf_counter()))

        def finished(*_):
            forward_seconds[0] += time.perf_counter() - started.pop()
            forward_calls[0] += 1

        backbone.register_forward_hook(finished)

    # Weights loaded from safetensors may be file-mapped pages that only count once touched: touch them all now,
    # so that the memory measured below is calibration's own.
    with torch.no_grad():
        for model in (dense, pruned):
            for parameter in model.parameters():
                parameter.sum()
    rss_before = _rss_mib()
    sampler = _RssSampler()
    sampler.start()
    begin = time.perf_counter()
    components = calibrate(
        dense,
        pruned,
        prompts,
        tokenizer,
        pairs=probe_pairs,
        strategy=strategy,
        position=position,
        batch_size=batch_size,
        max_length=max_length,
        progress=False,
    )
    total = time.perf_counter() - begin
    peak = sampler.stop()
    return {
        "samples": samples,
        "strategy": strategy,
        "position": position,
        "pairs": len(probe_pairs) if probe_pairs else 0,
        "negatives": negatives if probe_pairs else None,
        "pairs_s": round(pairs_seconds, 2),
        "batch_size": batch_size,
        "max_length": max_length,
        "prompt_tokens_mean": sum(tokens) / len(tokens),
        "threads": torch.get_num_threads(),
        "total_s": round(total, 2),
        "forward_s": round(forward_seconds[0], 2),
        "forward_calls": forward_calls[0],
        "other_s": round(total - forward_seconds[0], 2),
        "other_fraction": round((total - forward_seconds[0]) / total, 4),
        "rss_models_loaded_mib": round(rss_before, 1),
        "peak_rss_mib": round(peak, 1),
        "peak_extra_mib": round(peak - rss_before, 1),
        "heads": components.num_heads,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--strategy", default="lost_norm", choices=("probe", "lost_norm", "random"))
    parser.add_argument("--position", default="last", choices=("last", "all"))
    parser.add_argument("--pairs", type=int, default=128)
    parser.add_argument(
        "--negatives",
        nargs="+",
        default=["random"],
        choices=("random", "jaccard", "tfidf", "sentence-encoder"),
        help="how the probe's wrong answers are chosen (several only with --negatives-only)",
    )
    parser.add_argument("--negatives-only", type=int, default=None, metavar="PAIRS", help="time the negatives alone")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in each run (default: torch's)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--output", default="benchmarks/results/calibration.json")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # internal: a single run, JSON out
    args = parser.parse_args()
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    if args.one:
        if args.negatives_only is not None:
            result = time_negatives(args.negatives_only, args.negatives[0])
        else:
            result = one_run(
                args.samples[0], args.strategy, args.position, args.pairs, args.batch_size, args.max_length,
                args.negatives[0],
            )  # fmt: skip
        print("RESULT " + json.dumps(result))
        return
    if args.negatives_only is None and len(args.negatives) > 1:
        parser.error("several --negatives only with --negatives-only")
    results = []
    threads = [] if args.threads is None else ["--threads", str(args.threads)]
    if args.negatives_only is not None:
        for negatives in args.negatives:
            command = [
                sys.executable, __file__, "--one", "--negatives-only", str(args.negatives_only), "--negatives",
                negatives, *threads,
            ]  # fmt: skip
            output = subprocess.run(command, check=True, capture_output=True, text=True, env=os.environ).stdout
            result = json.loads(next(line for line in output.splitlines() if line.startswith("RESULT "))[7:])
            results.append(result)
            print(f"{result['pairs']} pairs, negatives by {negatives}: {result['seconds']:.1f} s", flush=True)
        _write(args.output, results)
        return
    for samples in args.samples:
        command = [
            sys.executable, __file__, "--one", "--samples", str(samples), "--strategy", args.strategy,
            "--position", args.position, "--pairs", str(args.pairs), "--batch-size", str(args.batch_size),
            "--max-length", str(args.max_length), "--negatives", args.negatives[0], *threads,
        ]  # fmt: skip
        output = subprocess.run(command, check=True, capture_output=True, text=True, env=os.environ).stdout
        result = json.loads(next(line for line in output.splitlines() if line.startswith("RESULT "))[7:])
        results.append(result)
        print(
            f"samples {samples:4d} ({result['prompt_tokens_mean']:.0f} tokens/prompt, {args.strategy}, {args.position}): "
            f"total {result['total_s']:.1f} s, forwards {result['forward_s']:.1f} s ({result['forward_calls']} calls), "
            f"other {result['other_s']:.2f} s = {100 * result['other_fraction']:.1f}%, "
            f"peak RSS {result['peak_rss_mib']:.0f} MiB (+{result['peak_extra_mib']:.0f} MiB over the two loaded models)",
            flush=True,
        )
    _write(args.output, results)


def _write(output: str, results: list[dict]) -> None:
    """Add this run to the file's "runs", replacing an earlier run of the same command."""
    path = Path(output)
    command = "python " + " ".join([os.path.relpath(sys.argv[0]), *sys.argv[1:]])
    recorded = json.loads(path.read_text()) if path.is_file() else {}
    runs = [run for run in recorded.get("runs", []) if run.get("command") != command]
    runs.append({"command": command, "load_average": list(os.getloadavg()), "results": results})
    recorded["runs"] = runs
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(recorded, indent=2) + "\n")
    print(f"written {output}")


if __name__ == "__main__":
    main()
