"""What each recovered checkpoint costs to serve in vLLM: the pruned model, RestoreLCC merged, LoRA merged and LoRA
unmerged (vLLM's LoRA support), one run each with the same prompts and sampling.

A SmolLM2-135M-shaped Llama (random weights: speed does not depend on them; 30 layers, 9 heads of 64, tied
embeddings), 50% pruned per row in every decoder linear. RestoreLCC compensates 2 of the 9 heads of every layer
(22%) and is merged into the ``o_proj`` biases; LoRA is r=8 on all linear layers. Each checkpoint is served by vLLM's
CPU build in its own venv (see serving_vllm.py): ``LLM(model=DIR, dtype="float32", enforce_eager=True,
max_model_len=256)``, greedy decoding of 64 new tokens (EOS ignored) for 16 prompts of 64 random tokens, one warm-up
then 5 timed repetitions: the best one counts (other processes on a shared machine only ever slow a run down; the
median is kept too). The pruned model is served first and again last: the spread of those two runs is the noise of
this machine. Peak memory is the sum of the peak resident sets (VmHWM) of the vLLM process and its engine processes.
Sparsity is read back from each saved checkpoint.

    python benchmarks/serving_throughput_vllm.py [--vllm-python /work/vllm-venv/bin/python]

Writes benchmarks/results/serving_throughput_vllm.json and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from serving_vllm import prune_rows
from shapes import smollm2_shaped_model
from transformers import LlamaForCausalLM

from peft_restorelcc import RestoreLCCConfig
from peft_restorelcc.io.export import save_merged

NUM_PROMPTS = 16
PROMPT_LEN = 64
NEW_TOKENS = 64
REPEATS = 5

CHILD = r"""
import json, statistics, sys, time


def peak_rss_bytes():
    import psutil

    total = 0
    for process in [psutil.Process(), *psutil.Process().children(recursive=True)]:
        try:
            for line in open(f"/proc/{process.pid}/status"):
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def main():
    import vllm
    from vllm import LLM, SamplingParams

    job = json.load(open(sys.argv[1]))
    kwargs = dict(model=job["model"], dtype="float32", enforce_eager=True, max_model_len=256, skip_tokenizer_init=True)
    request = None
    if job.get("lora"):
        from vllm.lora.request import LoRARequest

        kwargs.update(enable_lora=True, max_lora_rank=8, max_loras=1)
        request = LoRARequest("restore", 1, job["lora"])
    started = time.perf_counter()
    llm = LLM(**kwargs)
    load_seconds = time.perf_counter() - started
    prompts = [{"prompt_token_ids": ids} for ids in job["prompts"]]
    params = SamplingParams(max_tokens=job["new_tokens"], temperature=0.0, ignore_eos=True)
    llm.generate(prompts[:4], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True), lora_request=request)
    seconds, generated = [], 0
    for _ in range(job["repeats"]):
        started = time.perf_counter()
        outputs = llm.generate(prompts, params, lora_request=request)
        seconds.append(time.perf_counter() - started)
        generated = sum(len(output.outputs[0].token_ids) for output in outputs)
    first_tokens = [list(output.outputs[0].token_ids[:8]) for output in outputs[:2]]
    print("RESULT " + json.dumps({
        "vllm": vllm.__version__, "load_seconds": load_seconds, "seconds": seconds, "generated_tokens": generated,
        "peak_rss_bytes": peak_rss_bytes(), "first_tokens": first_tokens,
    }))


if __name__ == "__main__":  # vLLM spawns workers that re-import this file
    main()
"""


def smollm2_shaped_pruned(seed: int = 0) -> LlamaForCausalLM:
    model = smollm2_shaped_model(seed)
    prune_rows(model)
    return model


def decoder_sparsity(directory: Path) -> tuple[float, dict[str, torch.Tensor]]:
    """Overall zero fraction of the saved decoder linear weights, and their zero masks."""
    tensors = {}
    for file in directory.glob("*.safetensors"):
        tensors.update(load_file(file))
    masks = {n: t == 0 for n, t in tensors.items() if ".layers." in n and n.endswith("proj.weight")}
    zeros = sum(int(mask.sum()) for mask in masks.values())
    total = sum(mask.numel() for mask in masks.values())
    return zeros / total, masks


def run_vllm(vllm_python: str, job: dict, work: Path, name: str) -> dict:
    (work / f"{name}.json").write_text(json.dumps(job))
    (work / "child.py").write_text(CHILD)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("PYTHONPATH", None)  # the vLLM venv must not see the project's packages (other transformers)
    result = subprocess.run(
        [vllm_python, str(work / "child.py"), str(work / f"{name}.json")],
        capture_output=True,
        text=True,
        env=env,
        cwd=work,
        timeout=1800,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    if result.returncode != 0 or not lines:
        raise RuntimeError(f"vLLM failed on {name} (exit {result.returncode}):\n{result.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 3.6))
    labels = [row["checkpoint"].replace(" (", "\n(") for row in rows]
    ratios = [row["tokens_per_second_ratio_to_pruned"] for row in rows]
    colors = ["tab:gray" if row["sparsity_identical_to_pruned"] else "tab:red" for row in rows]
    bars = axis.bar(labels, ratios, color=colors)
    for bar, row in zip(bars, rows):
        note = "sparse" if row["sparsity_identical_to_pruned"] else "dense"
        axis.annotate(
            f"{bar.get_height():.2f}\n{note}",
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    axis.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    axis.set_ylabel("decode tokens/s vs pruned")
    axis.set_ylim(0, max(ratios) * 1.3)
    axis.set_title("vLLM 0.32 CPU, SmolLM2-135M-shaped, 50% pruned (grey: zeros kept, red: filled)", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vllm-python", default="/work/vllm-venv/bin/python")
    parser.add_argument(
        "--output", type=Path, default=Path(__file__).parent / "results" / "serving_throughput_vllm.json"
    )
    args = parser.parse_args()
    if not Path(args.vllm_python).exists():
        print(f"serving_throughput_vllm: no vLLM python at {args.vllm_python}; see serving_vllm.py.")
        return 2

    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 49152, (PROMPT_LEN,), generator=generator).tolist() for _ in range(NUM_PROMPTS)]
    job = {"prompts": prompts, "new_tokens": NEW_TOKENS, "repeats": REPEATS}
    with tempfile.TemporaryDirectory(prefix="serving_throughput_") as temp:
        work = Path(temp)
        pruned = smollm2_shaped_pruned()
        pruned.save_pretrained(work / "pruned")

        torch.manual_seed(1)
        heads = {layer: [0, 5] for layer in range(pruned.config.num_hidden_layers)}
        restorelcc = get_peft_model(
            smollm2_shaped_pruned(), RestoreLCCConfig(init_weights="gaussian", heads=heads, init_std=0.1, task_type="CAUSAL_LM")
        )
        save_merged(restorelcc, work / "restorelcc_merged")

        torch.manual_seed(2)
        lora_config = LoraConfig(
            r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM"
        )
        lora = get_peft_model(smollm2_shaped_pruned(), lora_config)
        lora.save_pretrained(work / "lora_adapter")  # served unmerged by vLLM's LoRA support
        lora.merge_and_unload().save_pretrained(work / "lora_merged")

        _, pruned_masks = decoder_sparsity(work / "pruned")
        plan = [
            ("pruned", work / "pruned", None),
            ("restorelcc merged", work / "restorelcc_merged", None),
            ("lora merged", work / "lora_merged", None),
            ("lora unmerged (vLLM LoRA)", work / "pruned", work / "lora_adapter"),
            ("pruned (again)", work / "pruned", None),
        ]
        runs = []
        for name, model_dir, adapter in plan:
            print(f"[{name}] serving {model_dir.name}{' + ' + adapter.name if adapter else ''} ...", flush=True)
            served = run_vllm(
                args.vllm_python,
                {**job, "model": str(model_dir), "lora": str(adapter or "")},
                work,
                name.split()[0] + str(len(runs)),
            )
            sparsity, masks = decoder_sparsity(model_dir)
            identical = masks.keys() == pruned_masks.keys() and all(
                torch.equal(masks[n], pruned_masks[n]) for n in masks
            )
            if adapter is not None:
                identical = True  # the served base is the pruned checkpoint itself; the adapter stays separate
            runs.append(
                {
                    "checkpoint": name,
                    # Best of the repetitions: other processes on a shared machine only ever slow a run down.
                    "tokens_per_second": served["generated_tokens"] / min(served["seconds"]),
                    "tokens_per_second_median": served["generated_tokens"] / statistics.median(served["seconds"]),
                    "load_average_1min_after": os.getloadavg()[0],
                    "seconds": served["seconds"],
                    "generated_tokens": served["generated_tokens"],
                    "peak_rss_gib": served["peak_rss_bytes"] / 2**30,
                    "load_seconds": served["load_seconds"],
                    "decoder_sparsity": sparsity,
                    "sparsity_identical_to_pruned": identical,
                    "vllm": served["vllm"],
                }
            )
            print(f"[{name}] {runs[-1]['tokens_per_second']:.1f} tokens/s", flush=True)

    baseline = statistics.mean(run["tokens_per_second"] for run in runs if run["checkpoint"].startswith("pruned"))
    for run in runs:
        run["tokens_per_second_ratio_to_pruned"] = run["tokens_per_second"] / baseline
    header = ("checkpoint", "tokens/s", "ratio", "peak RSS GiB", "sparsity", "zeros kept")
    table = [header] + [
        (
            run["checkpoint"],
            f"{run['tokens_per_second']:.1f}",
            f"{run['tokens_per_second_ratio_to_pruned']:.2f}",
            f"{run['peak_rss_gib']:.2f}",
            f"{run['decoder_sparsity']:.3f}",
            "yes" if run["sparsity_identical_to_pruned"] else "NO",
        )
        for run in runs
    ]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    for line in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths)))
    print(
        f"ratio: to the mean of the two pruned runs; {NUM_PROMPTS} prompts x {PROMPT_LEN} tokens, {NEW_TOKENS} new "
        f"tokens greedy, best of {REPEATS}"
    )

    args.output.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "command": "python " + " ".join(shlex.quote(part) for part in sys.argv),
        "machine": platform.platform(),
        "cpu_count": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d"),
        "model": "SmolLM2-135M-shaped Llama, random weights, 50% pruned per row",
        "workload": {"prompts": NUM_PROMPTS, "prompt_tokens": PROMPT_LEN, "new_tokens": NEW_TOKENS, "repeats": REPEATS},
        "rows": runs,
    }
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    plot(runs, args.output.with_suffix(".png"))
    print(f"wrote {args.output} and {args.output.with_suffix('.png')}")
    return 0


if __name__ == "__main__":  # vLLM spawns processes; the guard also keeps imports of this file side-effect free
    sys.exit(main())
