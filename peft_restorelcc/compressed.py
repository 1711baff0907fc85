"""Pruned models in compressed-tensors' sparse formats: ``sparse-bitmask`` and ``sparse-24-bitmask``, read and written.

llm-compressor saved pruned models this way: ``config.json`` carries ``quantization_config = {"quant_method":
"compressed-tensors", "sparsity_config": {"format": ..., "targets", "ignore", "sparsity_structure", ...}}`` and every
targeted Linear's ``weight`` is replaced in the safetensors by

* ``sparse-bitmask``: ``<module>.compressed`` (the non-zeros, row-major, 1-D), ``<module>.bitmask`` (uint8, rows x
  ceil(cols / 8), little bit order), ``<module>.row_offsets`` (where each row starts in ``compressed``) and
  ``<module>.shape``;
* ``sparse-24-bitmask``: ``<module>.compressed`` (rows x cols / 2: the two kept values of every group of four),
  ``<module>.bitmask`` and ``<module>.shape`` (2 x 1).

compressed-tensors 0.15 dropped these compressors, and stock transformers 5 with compressed-tensors >= 0.15 then
loads such a checkpoint with its sparse weights MISSING (randomly initialised, a warning table only). So the
checkpoint is decompressed here, exactly (every stored value bit for bit, every other weight zero), with the bit
packing of the installed compressed-tensors package (``pack_bitmasks`` / ``unpack_bitmasks``), and the model is
built by ``from_pretrained(None, config=..., state_dict=...)``, which keeps dtype and ``device_map`` handling.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .files import check_new_output_dir, staged_output_dir

BITMASK = "sparse-bitmask"
SPARSE24 = "sparse-24-bitmask"
SPARSE_FORMATS = (BITMASK, SPARSE24)
INSTALL_HINT = "pip install 'peft_restorelcc[compressed]' (or: pip install 'compressed-tensors>=0.15')"


def _compressed_tensors() -> Any:
    try:
        import compressed_tensors
        from compressed_tensors import utils
    except ImportError as error:
        raise ImportError(
            f"Reading or writing compressed-tensors models needs compressed-tensors: {INSTALL_HINT}."
        ) from error
    return compressed_tensors, utils


def _quantization_config(model_dir: str | os.PathLike) -> dict[str, Any]:
    config_file = Path(model_dir) / "config.json"
    if not config_file.is_file():
        return {}
    return json.loads(config_file.read_text()).get("quantization_config") or {}


def sparse_format(model_dir: str | os.PathLike) -> str | None:
    """``"sparse-bitmask"`` / ``"sparse-24-bitmask"`` for a sparse compressed-tensors checkpoint, else None.

    A compressed-tensors checkpoint that is quantized, or in a sparse format this module does not know, is refused
    with a ValueError: loading it as a plain model would silently drop its weights."""
    quantization = _quantization_config(model_dir)
    if quantization.get("quant_method") != "compressed-tensors":
        return None
    if quantization.get("config_groups"):
        raise ValueError(
            f"{model_dir} is a quantized compressed-tensors checkpoint: RestoreLCC needs the pruned model's weights in "
            "bf16/fp16/fp32. Save the pruned model without quantization (llm-compressor: a sparsity-only recipe)."
        )
    fmt = (quantization.get("sparsity_config") or {}).get("format", "dense")
    if fmt == "dense":
        return None  # plain dense weights: transformers loads them as they are
    if fmt not in SPARSE_FORMATS:
        raise ValueError(
            f"{model_dir}: compressed-tensors sparsity format {fmt!r} is not supported; supported: "
            f"{', '.join(SPARSE_FORMATS)} (and dense)."
        )
    return fmt


def _weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / name for name in names]
    single = model_dir / "model.safetensors"
    if not single.is_file():
        raise ValueError(f"{model_dir} has no model.safetensors (or index): not a compressed-tensors checkpoint.")
    return [single]


def decompress_weight(fmt: str, parts: dict[str, torch.Tensor], name: str = "weight") -> torch.Tensor:
    """The dense weight of one module from its stored parts (``compressed``, ``bitmask``, ``shape``, ...)."""
    _, utils = _compressed_tensors()
    missing = {"compressed", "bitmask", "shape"} - set(parts)
    if missing:
        raise ValueError(f"{name}: the {fmt} parts {sorted(missing)} are missing from the checkpoint.")
    shape = [int(v) for v in parts["shape"].flatten().tolist()]
    mask = utils.unpack_bitmasks(parts["bitmask"], shape)
    values = parts["compressed"].flatten()
    if fmt == BITMASK:
        # row_offsets is redundant with the mask; a mismatch means a corrupt file, not something to guess around.
        counts = mask.sum(dim=-1)
        if "row_offsets" in parts and not torch.equal(parts["row_offsets"].flatten(), counts.cumsum(0) - counts):
            raise ValueError(f"{name}: row_offsets disagree with the bitmask; the checkpoint is corrupt.")
    if int(mask.sum()) != values.numel():
        raise ValueError(
            f"{name}: the bitmask marks {int(mask.sum())} values but {values.numel()} are stored; the checkpoint is "
            "corrupt."
        )
    dense = torch.zeros(shape, dtype=values.dtype)
    dense[mask] = values
    return dense


def read_state_dict(model_dir: str | os.PathLike, fmt: str | None = None) -> dict[str, torch.Tensor]:
    """The dense state dict of a sparse compressed-tensors checkpoint (CPU tensors, stored dtype)."""
    model_dir = Path(model_dir)
    fmt = fmt or sparse_format(model_dir)
    if fmt not in SPARSE_FORMATS:
        raise ValueError(f"{model_dir} is not a sparse compressed-tensors checkpoint.")
    suffixes = ("compressed", "bitmask", "shape", "row_offsets")
    state: dict[str, torch.Tensor] = {}
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for path in _weight_files(model_dir):
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                prefix, _, suffix = key.rpartition(".")
                if suffix in suffixes:
                    grouped.setdefault(prefix, {})[suffix] = handle.get_tensor(key)
                else:
                    state[key] = handle.get_tensor(key)
    for prefix, parts in grouped.items():
        if "bitmask" not in parts:  # an ordinary tensor that happens to end in one of the names
            state.update({f"{prefix}.{suffix}": value for suffix, value in parts.items()})
            continue
        state[f"{prefix}.weight"] = decompress_weight(fmt, parts, prefix)
    return state


def load_sparse_model(
    model_dir: str | os.PathLike, dtype: torch.dtype | str | None = None, device_map: Any = None
) -> nn.Module:
    """A causal LM from a sparse compressed-tensors checkpoint, its weights decompressed exactly, in eval mode.

    ``dtype=None`` keeps the stored dtype. The config loses its ``quantization_config`` (the model is now plain)."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    model_dir = Path(model_dir)
    fmt = sparse_format(model_dir)
    state = read_state_dict(model_dir, fmt)
    config = AutoConfig.from_pretrained(model_dir)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    if dtype is None:
        dtype = next(value.dtype for key, value in state.items() if key.endswith(".weight"))
    # The concrete class: the Auto factory needs a path, and the weights come from memory here.
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    model = model_class.from_pretrained(None, config=config, state_dict=state, dtype=dtype, device_map=device_map)
    model.config._name_or_path = str(model_dir)
    return model.eval()


# ----------------------------------------------------------------------------------------------------------- write
def _target_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The pruned projections: every Linear inside the decoder blocks (what pruning.py prunes)."""
    from .pruning import _all_projections

    return {name: module for block in _all_projections(model) for name, module in block.items()
            if isinstance(module, nn.Linear)}  # fmt: skip


def holds_2_4(weight: torch.Tensor) -> bool:
    """Every group of four consecutive input weights has at most two non-zeros (the 2:4 format stores exactly two)."""
    from .pruning import check_nm_pattern

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

    from .pruning import measure_sparsity

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


def save_merged_sparse(
    model: nn.Module, output_dir: str | os.PathLike, tokenizer: Any = None, fmt: str | None = None
) -> Path:
    """``export.save_merged`` with the weights written in a compressed-tensors sparse format: a RestoreLCC
    ``PeftModel`` is merged into its output biases (the weights, so the sparsity, untouched), the config switched to
    carry the bias, and the model saved by ``save_sparse``. Refuses what ``save_merged`` refuses, before any change."""
    from .export import merged_for_export

    output_dir = check_new_output_dir(output_dir)
    return save_sparse(merged_for_export(model), output_dir, tokenizer=tokenizer, fmt=fmt)
