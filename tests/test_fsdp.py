"""Fully sharded data parallelism: 2 real CPU processes (gloo) train the same adapter as one process.

- A user's own loop with torch's FSDP2 (``fully_shard`` on every decoder layer and the model; tests/fsdp_user_loop.py)
  shards the bf16 base and the fp32 RestoreLCC parameters together, keeps the base frozen, and saves the adapter
  from the gathered state dict.
- ``accelerate launch --use_fsdp`` of the ``train`` command (the HF Trainer). accelerate 1.16 applies FSDP on GPU-like
  devices only: on CPU it runs the job as DDP over gloo. ``train`` says so in a warning and in its metrics
  (``distributed_type``), and the adapter is the single process's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_cli_train import save_adapter, save_model, write_jsonl
from test_ddp import train_in_one_thread, train_module_argv
from test_model import prune_half
from tiny_models import make_tiny_model

USER_LOOP = Path(__file__).with_name("fsdp_user_loop.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
for _name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_FSDP"):
    ENV.pop(_name, None)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fsdp")
    pruned = save_model(root / "pruned", prune_half(make_tiny_model("llama")))
    return {"pruned": pruned, "adapter": save_adapter(root / "adapter", pruned, init_std=0.05)}


def assert_same_trained_adapter(sharded: Path, single: Path, initial: Path, atol: float) -> None:
    sharded_weights = load_file(str(sharded / "adapter_model.safetensors"))
    single_weights = load_file(str(single / "adapter_model.safetensors"))
    before = load_file(str(initial / "adapter_model.safetensors"))
    assert sharded_weights.keys() == single_weights.keys() == before.keys()
    moved = 0.0
    for key, value in single_weights.items():
        assert sharded_weights[key].dtype == value.dtype == torch.float32, key
        torch.testing.assert_close(sharded_weights[key], value, rtol=0, atol=atol)
        moved = max(moved, float((value - before[key]).abs().max()))
    assert moved > 20 * atol  # trained adapters are compared, not two copies of the initial one


def run(command: list[str]) -> subprocess.CompletedProcess:
    result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def test_user_fully_shard_loop_two_processes_match_one_process(saved, tmp_path: Path) -> None:
    arguments = [str(saved["pruned"]), str(saved["adapter"])]
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(USER_LOOP),
         *arguments, str(tmp_path / "fsdp"), "bfloat16"])  # fmt: skip
    run([sys.executable, str(USER_LOOP), *arguments, str(tmp_path / "single"), "bfloat16"])

    reports = [json.loads(path.read_text()) for path in sorted((tmp_path / "fsdp").glob("base_change_rank*.json"))]
    assert [report["world_size"] for report in reports] == [2, 2]
    assert all(report["base_change"] == 0.0 for report in reports)  # every shard of the frozen bf16 base kept
    # bf16 matmuls of a batch of 2 and of 4 round differently; the adapter moves ~30x more than that.
    assert_same_trained_adapter(tmp_path / "fsdp", tmp_path / "single", saved["adapter"], atol=1e-3)


def test_train_under_accelerate_fsdp_matches_one_process(saved, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "data.jsonl", count=15)

    def flags(output: Path, batch_size: int) -> list[str]:
        return ["--model", str(saved["pruned"]), "--adapter", str(saved["adapter"]), "--output", str(output),
                "--data", str(data), "--seq-len", "32", "--batch-size", str(batch_size), "--max-steps", "3",
                "--lr", "1e-2", "--seed", "3", "--logging-steps", "1"]  # fmt: skip

    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--use_fsdp", "--fsdp_version", "2",
              "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP", "--fsdp_transformer_layer_cls_to_wrap",
              "LlamaDecoderLayer", "--fsdp_state_dict_type", "FULL_STATE_DICT"]  # fmt: skip
    module = train_module_argv()  # ["-m", module, (subcommand)]
    result = run([*launch, "-m", *module[1:], *flags(tmp_path / "fsdp", 2)])

    assert train_in_one_thread(flags(tmp_path / "single", 4)) == 0

    metrics = json.loads((tmp_path / "fsdp" / "train_metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["global_batch_size"] == 4 and metrics["steps"] == 3
    if metrics["distributed_type"] != "FSDP":  # accelerate on CPU: see the module docstring
        assert metrics["distributed_type"] == "MULTI_CPU"
        assert "FSDP was requested, but accelerate runs this job as MULTI_CPU" in result.stderr
    assert_same_trained_adapter(tmp_path / "fsdp", tmp_path / "single", saved["adapter"], atol=1e-5)


@pytest.fixture(autouse=True)
def _no_leftover_distributed_env(monkeypatch):
    # The in-process run must be a plain single process whatever the surrounding environment says.
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_FSDP"):
        monkeypatch.delenv(name, raising=False)
