"""Inference and training overhead of RestoreLCC against the pruned base and against LoRA.

A SmolLM2-135M-shaped Llama (random weights: speed does not depend on them), 50% magnitude-pruned, 25% of its heads
compensated. Runs are interleaved round by round and the medians of the per-round ratios are reported, so drift of
the machine (other processes, frequency) cancels out.

    python benchmarks/overhead.py [--rounds 7] [--batch 8] [--seq-len 128] [--output benchmarks/results/overhead.json]

Targets: unmerged forward <= 1.05x the base, merged <= 1.01x; a training step no slower and no larger in memory
than LoRA r=8 on all linear layers. Memory is the peak CUDA allocation on a GPU; on CPU, where torch has no
allocator statistics, it is the bytes a step must hold: tensors saved for backward + gradients + AdamW state.
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from shapes import smollm2_shaped_model
from tqdm import tqdm

from peft_restorelcc import RestoreLCCConfig
from peft_restorelcc.evaluation.statistics import training_memory_bytes
from peft_restorelcc.pruning import prune_model
from peft_restorelcc.tuner.heads import find_head_projections


def every_fourth_head(model: torch.nn.Module) -> dict[int, list[int]]:
    """25% of all heads, spread over layers (which heads does not change the cost, only how many)."""
    projections = find_head_projections(model)
    flat = [(p.layer_index, h) for p in projections for h in range(p.num_heads)]
    heads: dict[int, list[int]] = {}
    for layer, head in flat[::4]:
        heads.setdefault(layer, []).append(head)
    return heads


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_forward(model: torch.nn.Module, input_ids: torch.Tensor) -> float:
    synchronize()
    start = time.perf_counter()
    with torch.no_grad():
        model(input_ids)
    synchronize()
    return time.perf_counter() - start


def training_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, input_ids: torch.Tensor) -> float:
    """Seconds of one AdamW step."""
    synchronize()
    start = time.perf_counter()
    model(input_ids, labels=input_ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=False)
    synchronize()
    return time.perf_counter() - start


def training_memory(model: torch.nn.Module, input_ids: torch.Tensor) -> int:
    """Peak CUDA allocation of a step on a GPU; on CPU the bytes a step holds (see recovery.training_memory_bytes)."""
    batch = {"input_ids": input_ids, "labels": input_ids}
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        training_memory_bytes(model, batch)
        return torch.cuda.max_memory_allocated()
    return training_memory_bytes(model, batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/overhead.json"))
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"

    base = smollm2_shaped_model()
    prune_model(base, "magnitude", 0.5, progress=False)  # the package's own pruner: rows, decoder linears
    heads = every_fourth_head(base)
    num_heads = sum(len(h) for h in heads.values())
    restorelcc = get_peft_model(
        copy.deepcopy(base), RestoreLCCConfig(init_weights="gaussian", heads=heads, init_std=0.1, task_type="CAUSAL_LM")
    ).to(device)
    merged = copy.deepcopy(restorelcc).merge_and_unload().eval()
    lora = get_peft_model(copy.deepcopy(base), LoraConfig(r=8, target_modules="all-linear", task_type="CAUSAL_LM")).to(
        device
    )
    base = base.to(device)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, 49152, (args.batch, args.seq_len), generator=generator).to(device)

    forward_models = {"base": base, "unmerged": restorelcc.eval(), "merged": merged}
    for model in forward_models.values():  # warm-up
        time_forward(model, input_ids)
    forward = {name: [] for name in forward_models}
    for _ in tqdm(range(args.rounds), desc="forward rounds"):
        for name, model in forward_models.items():
            forward[name].append(time_forward(model, input_ids))

    train_models = {"restorelcc": restorelcc.train(), "lora": lora.train()}
    optimizers = {
        name: torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        for name, model in train_models.items()
    }
    for name, model in train_models.items():  # warm-up, also creates the optimizer state
        training_step(model, optimizers[name], input_ids)
    step_seconds = {name: [] for name in train_models}
    for _ in tqdm(range(args.rounds), desc="training rounds"):
        for name, model in train_models.items():
            step_seconds[name].append(training_step(model, optimizers[name], input_ids))
    step_bytes = {name: training_memory(model, input_ids) for name, model in train_models.items()}

    def median_ratio(numerator: list[float], denominator: list[float]) -> float:
        return statistics.median(a / b for a, b in zip(numerator, denominator))

    trainable = {
        name: sum(p.numel() for p in model.parameters() if p.requires_grad) for name, model in train_models.items()
    }
    results = {
        "command": shlex.join(["python", "benchmarks/overhead.py", *sys.argv[1:]]),
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "shape": "SmolLM2-135M (30 layers x 9 heads, head_dim 64), random weights, 50% magnitude-pruned",
        "compensated_heads": num_heads,
        "batch": [args.batch, args.seq_len],
        "rounds": args.rounds,
        "forward_seconds_median": {name: statistics.median(times) for name, times in forward.items()},
        "forward_ratio_unmerged_vs_base": median_ratio(forward["unmerged"], forward["base"]),
        "forward_ratio_merged_vs_base": median_ratio(forward["merged"], forward["base"]),
        "train_step_seconds_median": {name: statistics.median(times) for name, times in step_seconds.items()},
        "train_step_ratio_restorelcc_vs_lora": median_ratio(step_seconds["restorelcc"], step_seconds["lora"]),
        "train_memory_bytes": step_bytes,
        "train_memory_ratio_restorelcc_vs_lora": step_bytes["restorelcc"] / step_bytes["lora"],
        "trainable_parameters": trainable,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    print(
        f"\nforward: unmerged {results['forward_ratio_unmerged_vs_base']:.3f}x base (target <= 1.05), "
        f"merged {results['forward_ratio_merged_vs_base']:.3f}x (target <= 1.01)\n"
        f"training step: RestoreLCC {results['train_step_ratio_restorelcc_vs_lora']:.3f}x LoRA time (target <= 1), "
        f"{results['train_memory_ratio_restorelcc_vs_lora']:.3f}x LoRA memory (target <= 1)"
    )


if __name__ == "__main__":
    main()
