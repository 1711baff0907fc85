"""A user's own training loop for a RestoreLCC adapter under torch's FSDP2 (``fully_shard``), as tests/test_fsdp.py
runs it: ``torchrun --nproc_per_node 2 fsdp_user_loop.py MODEL ADAPTER OUTPUT DTYPE`` (gloo on CPU), or plain
``python`` for the single-process reference.

Each decoder layer and then the whole model is sharded; the frozen base (any dtype) and the fp32 adapter share the
layers' shards. Every process takes its equal share of each global batch of fixed-length sequences, so FSDP's
gradient average over processes is the single process's gradient on the whole batch. The adapter is saved from
the full (gathered) state dict by the main process.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
from peft import PeftModel
from transformers import AutoModelForCausalLM

GLOBAL_BATCH, SEQ_LEN, STEPS, LR = 4, 16, 3, 1e-2


def base_checksum(model: torch.nn.Module) -> float:
    """Sum of this process's part of the frozen base weights (its shards under FSDP)."""
    total = 0.0
    for name, parameter in model.named_parameters():
        if "restorelcc_" not in name:
            local = parameter.to_local() if hasattr(parameter, "to_local") else parameter
            total += float(local.detach().double().sum())
    return total


def main(model_dir: str, adapter_dir: str, output_dir: str, dtype: str) -> None:
    torch.set_num_threads(1)
    distributed = "RANK" in os.environ
    if distributed:
        dist.init_process_group("gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
    model = PeftModel.from_pretrained(base, adapter_dir, is_trainable=True)
    if distributed:
        from torch.distributed.fsdp import fully_shard

        for layer in model.get_base_model().model.layers:
            fully_shard(layer)
        fully_shard(model)
    before = base_checksum(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
    vocab = model.get_base_model().config.vocab_size
    generator = torch.Generator().manual_seed(0)
    share = GLOBAL_BATCH // world
    for _ in range(STEPS):
        batch = torch.randint(3, vocab, (GLOBAL_BATCH, SEQ_LEN), generator=generator)[rank * share : (rank + 1) * share]
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    state_dict = None
    if distributed:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state_dict = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # Every process sums its own shards of the base; a changed frozen weight changes some process's sum.
    changed = abs(base_checksum(model) - before)
    os.makedirs(output_dir, exist_ok=True)
    model.save_pretrained(output_dir, state_dict=state_dict, is_main_process=rank == 0)
    with open(os.path.join(output_dir, f"base_change_rank{rank}.json"), "w") as handle:
        json.dump({"world_size": world, "base_change": changed}, handle)
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:5])
