"""Time and memory of calibration on SmolLM2-135M: the dense model against a 50% magnitude-pruned copy.

The pruned copy zeroes the smallest half of every row of every projection in the decoder blocks (embeddings and
lm_head stay dense), in memory. Each configuration runs in a fresh subprocess so that the peak RSS is its own.
Forward time is measured by hooks around the decoder's forward (the capture hooks included); "other" is the rest
of ``calibrate``: tokenization, batching, accumulation, SVD, fingerprint, probe training.

    python benchmarks/calibration.py [--samples 128 512] [--strategy lost_norm] [--position last] [--pairs 128]
        [--batch-size 8] [--max-length 256] [--output benchmarks/results/calibration.json]

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


def one_run(samples: int, strategy: str, position: str, pairs: int, batch_size: int, max_length: int) -> dict:
    import torch

    from peft_restorelcc.assets import load_model, load_tokenizer
    from peft_restorelcc.calibration import calibrate
    from peft_restorelcc.calibration.capture import _backbone
    from peft_restorelcc.data import calibration_prompts, contrastive_pairs

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
    probe_pairs = contrastive_pairs(limit=pairs, seed=0) if strategy == "probe" else None
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
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--output", default="benchmarks/results/calibration.json")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # internal: a single run, JSON out
    args = parser.parse_args()
    if args.one:
        result = one_run(args.samples[0], args.strategy, args.position, args.pairs, args.batch_size, args.max_length)
        print("RESULT " + json.dumps(result))
        return
    results = []
    for samples in args.samples:
        command = [
            sys.executable, __file__, "--one", "--samples", str(samples), "--strategy", args.strategy,
            "--position", args.position, "--pairs", str(args.pairs), "--batch-size", str(args.batch_size),
            "--max-length", str(args.max_length),
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
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps({"command": " ".join(sys.argv), "results": results}, indent=2) + "\n")
    print(f"written {args.output}")


if __name__ == "__main__":
    main()
