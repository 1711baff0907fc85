"""A compressed-tensors sparse writer, for test fixtures only: legacy llm-compressor checkpoints (``sparse-bitmask``,
``sparse-24-bitmask``) are still READ by ``peft_restorelcc.io.compressed``, but nothing in the package writes them any more
(the ecosystem dropped the formats). The tests make such inputs with this writer, which test_compressed checks
against the files compressed-tensors 0.14's own compressors wrote (tests/data/compressed_tensors)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from peft_restorelcc.io.compressed import BITMASK, SPARSE24, SPARSE_FORMATS, _compressed_tensors
from peft_restorelcc.io.files import check_new_output_dir, staged_output_dir


def _target_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The pruned projections: every Linear inside the decoder blocks (what pruning.py prunes)."""
    from peft_restorelcc.pruning import _all_projections

    return {name: module for block in _all_projections(model) for name, module in block.items()
            if isinstance(module, nn.Linear)}  # fmt: skip


def holds_2_4(weight: torch.Tensor) -> bool:
    """Every group of four consecutive input weights has at most two non-zeros (the 2:4 format stores exactly two)."""
    from peft_restorelcc.pruning import check_nm_pattern

    return check_nm_pattern(weight, 2, 4)


def choose_format(model: nn.Module) -> str:
    """``sparse-24-bitmask`` when every pruned projection holds 2:4, else ``sparse-bitmask``."""
    modules = _target_modules(model)
    if modules and all(holds_2_4(module.weight.detach()) for module in modules.values()):
        return SPARSE24
    return BITMASK


def compress_weight(fmt: str, weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """The stored parts of one dense weight (out x in) in ``fmt``; ``decompress_weight`` inverts it exactly."""
    _, utils = _compressed_tensors()
    weight = weight.detach().cpu()
    rows, cols = weight.shape
    if fmt == BITMASK:
        mask = weight != 0
        counts = mask.sum(dim=-1)
        return {
            "shape": torch.tensor([rows, cols]),
            "compressed": weight[mask],
            "bitmask": utils.pack_bitmasks(mask),
            "row_offsets": counts.cumsum(0) - counts,
        }
    if fmt != SPARSE24:
        raise ValueError(f"Unknown sparse format {fmt!r}; choose one of {SPARSE_FORMATS}.")
    if not holds_2_4(weight):
        raise ValueError("The weight does not hold the 2:4 pattern; write it as sparse-bitmask.")
    # Exactly two stored values per group of four: the non-zeros, plus the first zeros where a group has fewer.
    groups = weight.reshape(rows, cols // 4, 4)
    nonzero = groups != 0
    order = torch.sort((~nonzero).to(torch.int8), dim=-1, stable=True).indices[..., :2]
    mask = torch.zeros_like(nonzero).scatter_(-1, order, True).reshape(rows, cols)
    return {
        "shape": torch.tensor([[rows], [cols]]),
        "compressed": weight[mask].reshape(rows, cols // 2),
        "bitmask": utils.pack_bitmasks(mask),
    }


def compressed_state_dict(model: nn.Module, fmt: str) -> dict[str, torch.Tensor]:
    """The model's state dict with every pruned projection's weight replaced by its ``fmt`` parts."""
    targets = _target_modules(model)
    state = {key: value.detach().cpu() for key, value in model.state_dict().items()}
    for name in targets:
        weight = state.pop(f"{name}.weight")
        state.update({f"{name}.{part}": value for part, value in compress_weight(fmt, weight).items()})
    return state


def save_sparse(model: nn.Module, output_dir: str | os.PathLike, tokenizer: Any = None, fmt: str | None = None) -> Path:
    """Save a (merged, plain) pruned model as a compressed-tensors sparse checkpoint; ``fmt=None`` picks 2:4 where
    every pruned projection holds it, else bitmask. Written into a temporary sibling first, so a failure leaves
    nothing. ``load_sparse_model`` reads it back with every weight bit-identical."""
    compressed_tensors, _ = _compressed_tensors()
    from compressed_tensors.config import BitmaskConfig, Sparse24BitMaskConfig

    from peft_restorelcc.pruning import measure_sparsity

    output_dir = check_new_output_dir(output_dir)
    fmt = fmt or choose_format(model)
    state = compressed_state_dict(model, fmt)
    sparsity = measure_sparsity(model)["overall_sparsity"]
    config_class, structure = (Sparse24BitMaskConfig, "2:4") if fmt == SPARSE24 else (BitmaskConfig, "unstructured")
    # What llm-compressor wrote: the Linears of the decoder (the LM head ignored), the sparsity and its structure.
    sparsity_config = config_class(
        targets=["Linear"], ignore=_ignored_linears(model), global_sparsity=sparsity, sparsity_structure=structure
    ).model_dump()
    with staged_output_dir(output_dir) as staging:
        model.config.save_pretrained(staging)
        generation = getattr(model, "generation_config", None)
        if generation is not None:
            generation.save_pretrained(staging)
        tied = _tied_duplicates(model)
        save_file(
            {key: value.contiguous() for key, value in state.items() if key not in tied},
            str(staging / "model.safetensors"),
            metadata={"format": "pt"},
        )
        config_file = staging / "config.json"
        config = json.loads(config_file.read_text())
        config["quantization_config"] = {
            "quant_method": "compressed-tensors",
            "version": compressed_tensors.__version__,
            "sparsity_config": sparsity_config,
            "transform_config": {},
        }
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True))
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
    return output_dir


def _ignored_linears(model: nn.Module) -> list[str]:
    """The Linears outside the decoder blocks (stored dense): the LM head and any other."""
    targets = set(_target_modules(model))
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear) and name not in targets]


def _tied_duplicates(model: nn.Module) -> set[str]:
    """State-dict keys that share storage with an earlier key (tied embeddings): saved once, as transformers does."""
    seen: dict[int, str] = {}
    duplicates = set()
    for key, value in model.state_dict().items():
        pointer = value.data_ptr()
        if pointer in seen and value.numel() > 0:
            duplicates.add(key)
        else:
            seen[pointer] = key
    return duplicates
