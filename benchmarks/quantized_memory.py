"""Peak memory of a RestoreLCC restore on a 4-bit (and 8-bit) bitsandbytes base against a bf16 base.

    python benchmarks/quantized_memory.py                      # smollm2-135m, bf16 / nf4 / int8, 4 steps
    python benchmarks/quantized_memory.py --model DIR --steps 8 --configs bf16,nf4

Each configuration runs in its own process (peak resident memory is per process): load the model (bf16, or
quantized by bitsandbytes with bf16 compute), wrap every attention head with RestoreLCC, train ``--steps`` AdamW
steps on random tokens (batch x seq-len), and record the kernel's peak resident set (``ru_maxrss``) after the
imports, after loading and after training, plus transformers' ``get_memory_footprint()`` of the loaded model. The
after-imports peak is the libraries' floor; the columns that matter are the increments over it. On the CPU the
numbers include bitsandbytes' CPU kernels (which dequantize per matmul); on a GPU, use ``--device cuda`` and the
``torch.cuda.max_memory_allocated`` column. Results: benchmarks/results/quantized_memory.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CONFIGS = ("bf16", "nf4", "int8")


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def one(config: str, model_name: str, steps: int, batch: int, seq_len: int, device: str) -> dict:
    import torch

    imports = peak_mib()
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    import peft_restorelcc
    from peft_restorelcc.io import bitsandbytes_config, resolve_model_path

    imports = peak_mib()
    path = resolve_model_path(model_name)
    started = time.perf_counter()
    if config == "bf16":
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map=device)
    else:
        quantization = bitsandbytes_config(config, torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.bfloat16, device_map=device, quantization_config=quantization
        )
        # Norms and embeddings to fp32 as PEFT's k-bit recipe does; gradient checkpointing off for both.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    footprint = model.get_memory_footprint() / 2**20
    loaded = peak_mib()
    torch.manual_seed(0)
    model = get_peft_model(model, peft_restorelcc.RestoreLCCConfig(init_weights="gaussian", task_type="CAUSAL_LM"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    vocab = model.config.get_text_config().vocab_size
    generator = torch.Generator().manual_seed(0)
    model.train()
    losses = []
    for _ in range(steps):
        ids = torch.randint(3, vocab, (batch, seq_len), generator=generator).to(model.device)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(round(loss.item(), 4))
    result = {
        "config": config,
        "model": model_name,
        "device": device,
        "steps": steps,
        "batch": batch,
        "seq_len": seq_len,
        "trainable_parameters": trainable,
        "model_footprint_mib": round(footprint, 1),
        "peak_rss_after_imports_mib": round(imports, 1),
        "peak_rss_after_load_mib": round(loaded, 1),
        "peak_rss_after_training_mib": round(peak_mib(), 1),
        "training_increment_over_imports_mib": round(peak_mib() - imports, 1),
        "seconds": round(time.perf_counter() - started, 1),
        "losses": losses,
    }
    if device.startswith("cuda"):
        result["cuda_max_allocated_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="embedded name or local directory")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, of {', '.join(CONFIGS)}")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", default=str(RESULTS / "quantized_memory.json"))
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one is not None:
        print(json.dumps(one(args.one, args.model, args.steps, args.batch, args.seq_len, args.device)))
        return 0
    rows = []
    for config in args.configs.split(","):
        command = [sys.executable, __file__, "--one", config, "--model", args.model, "--steps", str(args.steps),
                   "--batch", str(args.batch), "--seq-len", str(args.seq_len), "--device", args.device]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(
        json.dumps(
            {
                "command": " ".join(["python", "benchmarks/quantized_memory.py", *(argv or sys.argv[1:])]),
                "results": rows,
            },
            indent=2,
        )
        + "\n"
    )
    width = max(len(row["config"]) for row in rows)
    print(f"{'config':<{width}}  footprint MiB  peak after load  peak after training  training - imports  s")
    for row in rows:
        print(f"{row['config']:<{width}}  {row['model_footprint_mib']:>13}  {row['peak_rss_after_load_mib']:>15}  "
              f"{row['peak_rss_after_training_mib']:>19}  {row['training_increment_over_imports_mib']:>18}  {row['seconds']}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
