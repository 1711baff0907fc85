"""Data-parallel training: 2 real CPU processes (torchrun, gloo) running the real train CLI take the same steps as
one process with the same global batch.

Why they agree: the Trainer's seeded shuffle draws one permutation for every process, and each process takes its
share of each global batch from it, so 2 processes x batch 2 see exactly the 4 sequences that 1 process x batch 4
sees. The loss is normalised by the labelled tokens of the whole global batch (gathered over processes), so the
averaged gradients are those of the single process, up to float summation order.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_cli_train import run_cli, save_adapter, save_model, write_jsonl
from test_model import prune_half
from tiny_models import make_tiny_model


def train_module_argv() -> list[str]:
    """``-m peft_restorelcc train`` once the dispatcher can mount every subcommand; until then the train
    subcommand's own entry point (the same parser and code)."""
    from peft_restorelcc.cli import COMMAND_MODULES

    if all(importlib.util.find_spec(f"peft_restorelcc.cli.{name}_command") for name in COMMAND_MODULES):
        return ["-m", "peft_restorelcc", "train"]
    return ["-m", "peft_restorelcc.cli.train_command"]


def train_in_one_thread(flags: list[str]) -> int:
    """The train CLI in this process with one thread, like each of the launched processes."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_cli(["train", *flags])
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("distill", [False, True], ids=["lm-loss", "distillation"])
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path: Path, distill: bool) -> None:
    pruned = save_model(tmp_path / "pruned", prune_half(make_tiny_model("llama")))
    adapter = save_adapter(tmp_path / "adapter", pruned, init_std=0.05)
    data = write_jsonl(tmp_path / "data.jsonl", count=15)
    # The distillation loss is normalised by this package's compute_loss, the LM loss by the Trainer's own.
    teacher = ["--distill-from", str(save_model(tmp_path / "dense", make_tiny_model("llama"))), "--distill-alpha",
               "0.5", "--temperature", "2"] if distill else []  # fmt: skip

    def flags(output: Path, batch_size: int) -> list[str]:
        return ["--model", str(pruned), "--adapter", str(adapter), "--output", str(output), "--data", str(data),
                "--seq-len", "32", "--batch-size", str(batch_size), "--max-steps", "3", "--lr", "1e-2",
                "--seed", "3", "--logging-steps", "1", *teacher]  # fmt: skip

    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               *train_module_argv(), *flags(tmp_path / "ddp", 2)]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-4000:]

    assert train_in_one_thread(flags(tmp_path / "single", 4)) == 0

    ddp_metrics = json.loads((tmp_path / "ddp" / "train_metrics.json").read_text())
    single_metrics = json.loads((tmp_path / "single" / "train_metrics.json").read_text())
    assert ddp_metrics["world_size"] == 2 and single_metrics["world_size"] == 1
    assert ddp_metrics["global_batch_size"] == single_metrics["global_batch_size"] == 4
    assert ddp_metrics["steps"] == single_metrics["steps"] == 3
    ddp = load_file(str(tmp_path / "ddp" / "adapter_model.safetensors"))
    single = load_file(str(tmp_path / "single" / "adapter_model.safetensors"))
    before = load_file(str(adapter / "adapter_model.safetensors"))
    assert ddp.keys() == single.keys()
    moved = 0.0
    for key in single:
        torch.testing.assert_close(ddp[key], single[key], rtol=1e-4, atol=1e-6)
        moved = max(moved, float((single[key] - before[key]).abs().max()))
    assert moved > 1e-3  # the comparison is between trained adapters, not two copies of the initial one
    # Only the main process writes: one adapter, one metrics file, no stray files of rank 1.
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir() if not p.name.startswith("checkpoint")) == sorted(
        p.name for p in (tmp_path / "single").iterdir() if not p.name.startswith("checkpoint")
    )


@pytest.fixture(autouse=True)
def _no_leftover_distributed_env(monkeypatch):
    # The in-process run must be a plain single process whatever the surrounding environment says.
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
