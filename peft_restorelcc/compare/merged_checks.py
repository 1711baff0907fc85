"""What a merged model costs and whether it travels: ``restorelcc compare``'s checks of each trained adapter, merged.

The adapter is merged once, in place (the trained PEFT model is not used afterwards), and the merged model is
measured three ways: the sparsity of its weights (and the share of the pruned model's zeros still exactly zero), its
forward time against the pruned model's on one fixed batch (same device, warmed up, repeats interleaved so both see
the same machine, the fastest repeat of each kept: other processes only ever add time, as ``timeit`` reasons), and
whether stock ``AutoModelForCausalLM.from_pretrained`` reloads the saved copy with the same logits. Before the merge,
``unmerged_speed`` times the trained model as PEFT runs it, base plus adapter, the same way: what serving the adapter
unmerged costs.
"""

from __future__ import annotations

import gc
import math
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..io.devices import input_device
from ..io.export import save_merged
from ..pruning import measure_sparsity

# The fixed batch both models are timed on, and the smaller one the reload is checked on (token ids drawn from a
# seeded generator: the same for every run, every method, every machine).
SPEED_BATCH = (4, 64)
RELOAD_BATCH = (2, 32)
SPEED_REPEATS = 5
# A reload counts as faithful when its logits differ from the in-memory merged model's by at most this share of
# their largest magnitude (0 expected in float32: the same weights, the same kernels).
RELOAD_TOLERANCE = 1e-3


def merge_once(peft_model: nn.Module) -> nn.Module:
    """The adapter merged into its base weights, in place: the one merge of a run (RestoreLCC's goes through the
    tuner's merge policy, which switches the config on to carry the output bias; where no config can, qwen2 and
    kin, the export converts the model, so the tuner's warning about it is not shown)."""
    if not hasattr(peft_model, "merge_and_unload"):  # trained in place (every weight): nothing to merge
        return peft_model.eval()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*no config switch for an attention output bias")
        merged = peft_model.merge_and_unload()
    merged.eval()
    return merged


def fixed_batch(model: nn.Module, shape: tuple[int, int], seed: int = 0) -> torch.Tensor:
    """Token ids of ``shape`` (rows, length capped by the model's positions), from a generator seeded with ``seed``."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    length = min(shape[1], getattr(config, "max_position_embeddings", shape[1]) or shape[1])
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, config.vocab_size, (shape[0], length), generator=generator)


@torch.no_grad()
def _forward_seconds(model: nn.Module, ids: torch.Tensor) -> float:
    ids = ids.to(input_device(model))
    if ids.device.type == "cuda":
        torch.cuda.synchronize(ids.device)
    start = time.perf_counter()
    model(input_ids=ids)
    if ids.device.type == "cuda":
        torch.cuda.synchronize(ids.device)
    return time.perf_counter() - start


def _fastest_forwards(pruned: nn.Module, other: nn.Module, repeats: int) -> tuple[float, float, torch.Tensor]:
    """The fastest of ``repeats`` forward passes of ``pruned`` and ``other`` on one fixed batch (warmed up, repeats
    interleaved, Python's garbage collector paused), and the batch. Both models' train/eval modes are restored."""
    ids = fixed_batch(pruned, SPEED_BATCH)
    modes, collecting = (pruned.training, other.training), gc.isenabled()
    pruned.eval()
    other.eval()
    gc.disable()
    try:
        _forward_seconds(pruned, ids), _forward_seconds(other, ids)  # warm-up: kernels, caches, lazy allocations
        times: dict[str, list[float]] = {"pruned": [], "other": []}
        for _ in range(repeats):  # interleaved: a slower moment of the machine hits both
            times["pruned"].append(_forward_seconds(pruned, ids))
            times["other"].append(_forward_seconds(other, ids))
    finally:
        pruned.train(modes[0])
        other.train(modes[1])
        if collecting:
            gc.enable()
    return min(times["pruned"]), min(times["other"]), ids


def unmerged_speed(pruned: nn.Module, model: nn.Module, repeats: int = SPEED_REPEATS) -> dict[str, Any]:
    """The trained model's forward time *unmerged* (base plus adapter, as PEFT runs it) against the pruned model's,
    timed as ``inference_speed`` times the merged one: the cost of serving the adapter without merging it
    (``unmerged_speed_ratio``: pruned seconds / unmerged seconds, below 1 = slower)."""
    pruned_seconds, unmerged_seconds, _ = _fastest_forwards(pruned, model, repeats)
    return {
        "unmerged_pruned_forward_seconds": round(pruned_seconds, 5),
        "unmerged_forward_seconds": round(unmerged_seconds, 5),
        "unmerged_speed_ratio": pruned_seconds / unmerged_seconds if unmerged_seconds > 0 else None,
    }


def inference_speed(pruned: nn.Module, merged: nn.Module, repeats: int = SPEED_REPEATS) -> dict[str, Any]:
    """The fastest of ``repeats`` forward passes of the pruned and the merged model on one fixed batch, and the merged
    model's speed as a ratio to the pruned one's (pruned seconds / merged seconds: 1.0 = as fast, above 1 = faster).
    Python's garbage collector is paused while timing."""
    pruned_seconds, merged_seconds, ids = _fastest_forwards(pruned, merged, repeats)
    return {
        "pruned_forward_seconds": round(pruned_seconds, 5),
        "merged_forward_seconds": round(merged_seconds, 5),
        "merged_speed_ratio": pruned_seconds / merged_seconds if merged_seconds > 0 else None,
        "speed_batch": list(ids.shape),
        "speed_device": str(input_device(merged)),
    }


def save_merged_copy(merged: nn.Module, output: Path, tokenizer: Any, restorelcc: bool) -> Path:
    """Write the merged model as a user would: RestoreLCC through the project's export (``io.export.save_merged``: the
    config carries the output bias, or the model is converted where it cannot), PEFT's methods with
    ``save_pretrained`` (their merge leaves a plain model of the same architecture)."""
    if restorelcc:
        return save_merged(merged, output, tokenizer=tokenizer)
    merged.save_pretrained(output, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(output)
    return output


@torch.no_grad()
def reload_check(merged: nn.Module, saved: Path) -> dict[str, Any]:
    """Reload ``saved`` with stock ``AutoModelForCausalLM.from_pretrained`` (same dtype, same device) and compare its
    logits with the in-memory merged model's on a fixed batch. A failed load is recorded, not raised."""
    from transformers import AutoModelForCausalLM

    ids = fixed_batch(merged, RELOAD_BATCH)
    device = input_device(merged)
    try:
        reloaded = AutoModelForCausalLM.from_pretrained(saved, dtype=merged.dtype).to(device).eval()
    except Exception as error:  # noqa: BLE001 - what failed is the result
        return {"reloads_in_transformers": False, "reload_max_abs_diff": None,
                "reload_error": f"{type(error).__name__}: {error}"}  # fmt: skip
    try:
        merged.eval()
        expected = merged(input_ids=ids.to(device)).logits.float()
        actual = reloaded(input_ids=ids.to(device)).logits.float()
    finally:
        del reloaded
    if expected.shape != actual.shape:
        return {"reloads_in_transformers": False, "reload_max_abs_diff": None,
                "reload_error": f"logits of shape {list(actual.shape)}, not {list(expected.shape)}"}  # fmt: skip
    diff = (expected - actual).abs().max().item()
    if not math.isfinite(diff):  # JSON has no NaN: say so in words
        return {"reloads_in_transformers": False, "reload_max_abs_diff": None, "reload_error": "non-finite logits"}
    scale = max(1.0, expected.abs().max().item())
    return {"reloads_in_transformers": bool(diff <= RELOAD_TOLERANCE * scale), "reload_max_abs_diff": diff}


@torch.no_grad()
def pruned_zeros_kept(pruned: nn.Module, merged: nn.Module) -> float | None:
    """The share of the pruned model's zero weights (every 2-D weight both models hold under the same name and shape)
    that are still exactly zero in the merged model: 1.0 when the merge kept every pruned zero; None with no zeros."""
    merged_weights = dict(merged.named_parameters())
    zeros = kept = 0
    for name, weight in pruned.named_parameters():
        other = merged_weights.get(name)
        if weight.dim() != 2 or other is None or other.shape != weight.shape:
            continue
        was_zero = weight == 0
        zeros += int(was_zero.sum())
        kept += int((other.to(weight.device)[was_zero] == 0).sum())
    return kept / zeros if zeros else None


def merged_measures(
    peft_model: nn.Module, pruned: nn.Module, tokenizer: Any, work: Path, restorelcc: bool
) -> dict[str, Any]:
    """Merge ``peft_model`` once (in place) and measure the merged model: sparsity, inference speed against
    ``pruned``, and the stock reload of the copy saved in a temporary directory under ``work`` (removed after)."""
    merged = merge_once(peft_model)
    measured: dict[str, Any] = {"sparsity_after_merge": measure_sparsity(merged)["overall_sparsity"],
                                "pruned_zeros_kept": pruned_zeros_kept(pruned, merged)}  # fmt: skip
    measured |= inference_speed(pruned, merged)
    work.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="merged-", dir=work))
    try:
        saved = save_merged_copy(merged, scratch / "merged", tokenizer, restorelcc)
        measured |= reload_check(merged, saved)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return measured
