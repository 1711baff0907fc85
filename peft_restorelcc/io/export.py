"""Merge and export: the merged model written so that stock transformers reloads it with its compensation.

The merge itself follows the family policy (``merge_policy``); architectures whose config cannot carry the
output bias are converted to the exactly equivalent Llama (``conversion``); compressed-tensors W4A16 checkpoints
get the bias written beside their packed weights (``save_merged_packed``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from ..tuner.config import PEFT_TYPE
from ..tuner.heads import find_head_projections, is_quantized_projection, text_config
from . import conversion
from .compressed import is_sparsity_only
from .files import check_new_output_dir, staged_output_dir, state_bytes
from .merge_policy import (
    ATTENTION_BIAS_SWITCH,
    NO_OUTPUT_BIAS,
    bias_reload_problem,
    make_output_bias_reloadable,
    model_type_of,
)

# The config field a merged model carries (conversion.PROVENANCE_KEY too): what was merged, and a refusal to merge
# a second compensation on top.
MERGED_KEY = "restorelcc_merged"


def strip_serving_blockers(config: Any) -> list[str]:
    """Drop the config fields a serving engine rejects from a merged model's config; returns what was dropped.

    A merged model is written as plain safetensors with the zeros stored. A ``sparsity_config`` (top level, or in a
    compressed-tensors ``quantization_config`` that quantizes nothing) describes a storage format the weights are no
    longer in, and vLLM 0.24+ refuses it (vLLM issue 51188). A real quantization config is kept.
    """
    dropped = []
    if getattr(config, "sparsity_config", None) is not None:
        del config.sparsity_config
        dropped.append("sparsity_config")
    if is_sparsity_only(getattr(config, "quantization_config", None)):
        del config.quantization_config
        dropped.append("quantization_config")
    return dropped


def merged_for_export(model: nn.Module, safe_merge: bool = True) -> PreTrainedModel:
    """The merged model, its config switched to carry the output bias (``make_output_bias_reloadable``), ready to
    be written by any writer. Refuses, before touching the model, an architecture whose config cannot carry it."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    check_not_merged(base)
    reason = bias_reload_problem(base)
    if reason is not None:
        raise ValueError(
            f"Cannot export a merged RestoreLCC model: {reason} A stock from_pretrained would silently drop the "
            "compensation. Save the adapter instead (model.save_pretrained) and load it with "
            "PeftModel.from_pretrained."
        )
    merged = model.merge_and_unload(safe_merge=safe_merge) if hasattr(model, "merge_and_unload") else model
    if not isinstance(merged, PreTrainedModel):
        raise ValueError(f"Expected a transformers PreTrainedModel after merging, got {type(merged).__name__}.")
    make_output_bias_reloadable(merged)
    strip_serving_blockers(merged.config)
    if hasattr(model, "peft_config"):  # the marker a second merge onto this model is refused by
        setattr(merged.config, MERGED_KEY, merge_provenance(model))
    return merged


def merge_provenance(model: nn.Module) -> dict[str, Any]:
    """What ``restorelcc_merged`` records for a same-architecture merge: the adapter's base model and revision."""
    peft_config = next(iter(getattr(model, "peft_config", {}).values()), None)
    return {
        "base_model": getattr(peft_config, "base_model_name_or_path", None) or None,
        "base_revision": getattr(peft_config, "revision", None),
        "peft_type": PEFT_TYPE,
    }


def check_not_merged(model_or_config: Any, where: str = "The model") -> None:
    """Refuse a model that already holds a merged RestoreLCC compensation: merging again would add it twice."""
    config = getattr(model_or_config, "config", model_or_config)
    marker = config.get(MERGED_KEY) if isinstance(config, dict) else getattr(config, MERGED_KEY, None)
    if marker:
        base = marker.get("base_model") if isinstance(marker, dict) else None
        raise ValueError(
            f"{where} already holds a merged RestoreLCC compensation ({MERGED_KEY} in its config"
            + (f", merged onto {base}" if base else "")
            + "): merging again would add it twice. Merge the adapter into the pruned model it was trained on."
        )


def _save_merged_same_architecture(
    model: nn.Module, output_dir: str | os.PathLike, tokenizer=None, safe_merge: bool = True
) -> Path:
    """Merge a RestoreLCC ``PeftModel`` (or take an already merged model) and save a standard transformers
    directory that stock ``AutoModelForCausalLM.from_pretrained`` reloads with the compensation.

    Refuses, before touching the model, an architecture whose config cannot carry the merged bias, and a
    non-empty output directory. Writes into a temporary sibling directory first, so a failure leaves nothing.
    """
    output_dir = check_new_output_dir(output_dir)
    merged = merged_for_export(model, safe_merge=safe_merge)
    export_info = {"merged": True, "attention_bias": getattr(text_config(merged), "attention_bias", None)}
    return _write_merged(merged, output_dir, tokenizer, export_info)


def _write_merged(merged: PreTrainedModel, output_dir: Path, tokenizer: Any, export_info: dict[str, Any]) -> Path:
    """The merged model, its tokenizer and ``restorelcc_export.json``, staged beside ``output_dir`` and renamed."""
    with staged_output_dir(output_dir, expected_bytes=state_bytes(merged)) as staging:
        merged.save_pretrained(staging, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        (staging / "restorelcc_export.json").write_text(json.dumps(export_info))
    return output_dir


def save_merged(
    model: nn.Module, output_dir: str | os.PathLike, tokenizer=None, safe_merge: bool = True
) -> Path:
    """Merge a RestoreLCC ``PeftModel`` (or take an already merged model) and save a standard transformers
    directory that stock ``AutoModelForCausalLM.from_pretrained`` (and vLLM) reloads with the compensation.

    Architectures whose config switches an output bias on are saved as they are; qwen2 / mistral / phi3, which
    hard-code it off, are saved as the exactly equivalent ``LlamaForCausalLM`` with ``attention_bias=True`` and a
    ``restorelcc_merged`` provenance field (conversion.py). What neither can carry (mixtral, an active sliding window,
    unknown config fields) is refused with one line before the model is touched, as is a non-empty output directory.
    Writes into a temporary sibling directory first, so a failure leaves nothing.
    """
    import warnings

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if model_type_of(base) not in NO_OUTPUT_BIAS:
        return _save_merged_same_architecture(model, output_dir, tokenizer=tokenizer, safe_merge=safe_merge)
    check_not_merged(base)
    problem = conversion.conversion_problem(base.config)  # refuse before merging: the model stays untouched
    if problem is not None:
        raise ValueError(f"Cannot export a merged RestoreLCC model of the {model_type_of(base)} architecture: {problem}.")
    output_dir = check_new_output_dir(output_dir)
    adapter_base = merge_provenance(model)
    provenance = conversion.provenance_for(
        base, base_model=adapter_base["base_model"], base_revision=adapter_base["base_revision"]
    )
    with warnings.catch_warnings():
        # The tuner warns that this family cannot carry the merged bias; the conversion below is what carries it.
        warnings.filterwarnings("ignore", message=".*no config switch for an attention output bias")
        merged = model.merge_and_unload(safe_merge=safe_merge) if hasattr(model, "merge_and_unload") else model
    strip_serving_blockers(merged.config)
    converted = conversion.convert_to_llama(merged, provenance=provenance)
    export_info = {"merged": True, "attention_bias": True, "converted_from": provenance["source_model_type"]}
    return _write_merged(converted, output_dir, tokenizer, export_info)


def quantized_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every quantized projection's storage and scales (``weight.data``, ``quant_state.absmax``, ``SCB``), copied to
    the CPU: what a RestoreLCC merge into a quantized model must leave bit for bit."""
    tensors = {}
    for name, module in model.named_modules():
        if is_quantized_projection(module):
            tensors[f"{name}.weight"] = module.weight.data.detach().cpu().clone()
            quant_state = getattr(module.weight, "quant_state", None)
            if quant_state is not None:
                tensors[f"{name}.absmax"] = quant_state.absmax.detach().cpu().clone()
            if getattr(module.weight, "SCB", None) is not None:
                tensors[f"{name}.SCB"] = module.weight.SCB.detach().cpu().clone()
    return tensors


def changed_quantized_tensors(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> list[str]:
    """Names of the tensors of ``before`` that ``after`` lacks or holds with other bits."""
    return sorted(
        name
        for name in before
        if name not in after
        or before[name].shape != after[name].shape
        or not torch.equal(before[name], after[name].to(before[name].dtype))
    )


# --- A merge into a compressed-tensors (llm-compressor) quantized checkpoint, its packed weights untouched. --------

COMPRESSED_TENSORS = "compressed-tensors"
_INDEX_NAME = "model.safetensors.index.json"
_SINGLE_NAME = "model.safetensors"


def checkpoint_config(model_dir: str | os.PathLike) -> dict[str, Any]:
    """The ``config.json`` of a local checkpoint directory as a dict ({} when there is none)."""
    config_file = Path(model_dir) / "config.json"
    if not config_file.is_file():
        return {}
    config = json.loads(config_file.read_text())
    return config if isinstance(config, dict) else {}


def is_compressed_tensors_quantized(model_dir: str | os.PathLike) -> bool:
    """A checkpoint quantized by compressed-tensors (llm-compressor's format: ``quant_method`` compressed-tensors with
    quantization ``config_groups``), as opposed to plain weights or a sparsity-only compressed-tensors checkpoint."""
    quantization = checkpoint_config(model_dir).get("quantization_config") or {}
    return (
        isinstance(quantization, dict)
        and quantization.get("quant_method") == COMPRESSED_TENSORS
        and bool(quantization.get("config_groups"))
    )


def _checkpoint_shards(model_dir: Path) -> tuple[list[str], dict[str, str] | None]:
    """``(shard file names, weight_map or None for a single file)`` of a safetensors checkpoint."""
    index = model_dir / _INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return sorted(set(weight_map.values())), weight_map
    if not (model_dir / _SINGLE_NAME).is_file():
        raise ValueError(f"{model_dir} has no {_SINGLE_NAME} (or {_INDEX_NAME}): not a safetensors checkpoint.")
    return [_SINGLE_NAME], None


def checkpoint_tensor_names(model_dir: str | os.PathLike) -> list[str]:
    """The names of every tensor in a safetensors checkpoint directory (single file or sharded)."""
    from safetensors import safe_open

    model_dir = Path(model_dir)
    names = []
    for shard in _checkpoint_shards(model_dir)[0]:
        with safe_open(model_dir / shard, framework="pt") as handle:
            names.extend(handle.keys())
    return names


def _attention_biases(merged: nn.Module) -> dict[str, torch.Tensor]:
    """The biases of every attention projection (q/k/v and the output projection) of a merged model, on the CPU."""
    biases = {}
    for projection in find_head_projections(merged):
        attention_name = projection.name.rsplit(".", 1)[0]
        for child_name, linear in merged.get_submodule(attention_name).named_children():
            if isinstance(linear, nn.Linear) and linear.bias is not None:
                biases[f"{attention_name}.{child_name}.bias"] = linear.bias.detach().cpu().contiguous().clone()
    return biases


def _checkpoint_name(bias_name: str, module_prefixes: set[str]) -> str | None:
    """The checkpoint's name for a model's bias (the same, or without a leading wrapper prefix), or None."""
    module = bias_name[: -len(".bias")]
    parts = module.split(".")
    for start in range(len(parts)):
        candidate = ".".join(parts[start:])
        if candidate in module_prefixes:
            return f"{candidate}.bias"
    return None


def _shard_of(weight_map: dict[str, str], bias_name: str) -> str | None:
    """The shard that holds the weight (packed or not) of the module a bias belongs to: the bias goes beside it."""
    module = bias_name[: -len(".bias")]
    for part in ("bias", "weight_packed", "weight", "weight_scale"):
        if f"{module}.{part}" in weight_map:
            return weight_map[f"{module}.{part}"]
    return next((shard for name, shard in weight_map.items() if name.startswith(f"{module}.")), None)


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().flatten().view(torch.uint8)


def packed_merge_problem(model_type: str | None, source: str | os.PathLike) -> str | None:
    """Why a RestoreLCC merge cannot be written beside the packed weights of ``source``, or None: its config must
    switch the attention biases on (``attention_bias``), as no other config field can carry them."""
    if model_type in ATTENTION_BIAS_SWITCH:
        return None
    return (
        f"Cannot merge RestoreLCC into the packed {model_type} checkpoint {source}: its config has no attention_bias "
        f"switch to carry the merged bias (supported: {', '.join(sorted(ATTENTION_BIAS_SWITCH))}). Keep the adapter "
        "separate, or save_merged the dequantized model as a dense one."
    )


# Long on purpose: the refusals, then one pass over the checkpoint's shards that copies every tensor bit for bit
# and writes the merged biases beside them; each step reads what the one before found in the shards.
def save_merged_packed(
    model: nn.Module,
    packed_checkpoint_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    tokenizer=None,
    safe_merge: bool = True,
) -> Path:
    """Merge a RestoreLCC adapter into a compressed-tensors (llm-compressor) quantized checkpoint without touching
    a quantized tensor.

    ``model`` is the RestoreLCC ``PeftModel`` (or the merged model) built on ``packed_checkpoint_dir`` loaded with
    ``quantization_config=transformers.CompressedTensorsConfig(dequantize=True)`` (RestoreLCC does not wrap the
    packed layers). ``output_dir`` receives every tensor of the checkpoint's safetensors files bit for bit (packed
    weights, scales, zero points, everything else), plus the merged attention biases (the output projection's, and
    zero q/k/v biases as ``save_merged`` writes), in a ``config.json`` with ``attention_bias=True`` and the original
    ``quantization_config``: stock transformers and vLLM load it as the same quantized model, with the compensation.

    Refused with one line, before the model is touched: a checkpoint that is not compressed-tensors quantized, an
    architecture whose config cannot carry the bias (qwen2, mistral, phi3, ...: save_merged converts those to a
    dense Llama, which a packed checkpoint cannot be), a checkpoint that already holds a merge, a non-empty output.
    The source directory is only read. Returns ``output_dir``.
    """
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    source = Path(packed_checkpoint_dir).expanduser()
    if not is_compressed_tensors_quantized(source):
        raise ValueError(
            f"{source} is not a compressed-tensors quantized checkpoint (config.json quantization_config.quant_method "
            "'compressed-tensors' with config_groups); save_merged writes any other model."
        )
    source_config = checkpoint_config(source)
    check_not_merged(source_config, where=str(source))
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    model_type = model_type_of(base)
    if model_type != source_config.get("model_type") and source_config.get("model_type") is not None:
        raise ValueError(f"The model ({model_type}) was not loaded from {source} ({source_config.get('model_type')}).")
    problem = packed_merge_problem(model_type, source)
    if problem is not None:
        raise ValueError(problem)
    shards, weight_map = _checkpoint_shards(source)
    output_dir = check_new_output_dir(output_dir)
    merged = merged_for_export(model, safe_merge=safe_merge)
    module_prefixes = set()
    for shard in shards:
        with safe_open(source / shard, framework="pt") as handle:
            for key in handle.keys():
                module_prefixes.add(key.rsplit(".", 1)[0])
    biases = {}
    for name, bias in _attention_biases(merged).items():
        checkpoint_name = _checkpoint_name(name, module_prefixes)
        if checkpoint_name is None:
            raise ValueError(f"{source} has no tensors for {name[: -len('.bias')]}: the model was not loaded from it.")
        biases[checkpoint_name] = bias
    config = dict(source_config)
    config["attention_bias"] = True
    if isinstance(config.get("text_config"), dict) and "attention_bias" in config["text_config"]:
        config["text_config"] = {**config["text_config"], "attention_bias": True}
    config[MERGED_KEY] = merge_provenance(model) if hasattr(model, "peft_config") else {"peft_type": PEFT_TYPE}
    export_info = {
        "merged": True,
        "attention_bias": True,
        "packed_from": str(source),
        "quantization": COMPRESSED_TENSORS,
        "biases": sorted(biases),
    }
    with staged_output_dir(output_dir) as staging:
        for item in source.iterdir():  # tokenizer, generation config, recipe: everything but weights and config
            if item.is_file() and item.suffix != ".safetensors" and item.name not in (_INDEX_NAME, "config.json"):
                shutil.copyfile(item, staging / item.name)
        pending = dict(biases)
        new_map = dict(weight_map) if weight_map is not None else None
        for shard in shards:
            with safe_open(source / shard, framework="pt") as handle:
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}
                metadata = handle.metadata() or {"format": "pt"}
            mine = {
                name: pending.pop(name)
                for name in list(pending)
                if weight_map is None or _shard_of(weight_map, name) == shard
            }
            tensors.update(mine)  # a bias the checkpoint already had (attention_bias was on) is replaced
            save_file(tensors, staging / shard, metadata=metadata)
            if new_map is not None:
                new_map.update({name: shard for name in mine})
        if pending:
            raise ValueError(f"{source}: no shard holds the weights of {sorted(pending)[0][: -len('.bias')]}.")
        if new_map is not None:
            index = json.loads((source / _INDEX_NAME).read_text())
            index["weight_map"] = dict(sorted(new_map.items()))
            (staging / _INDEX_NAME).write_text(json.dumps(index, indent=2))
        (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        (staging / "restorelcc_export.json").write_text(json.dumps(export_info))
    return output_dir


def changed_checkpoint_tensors(
    source_dir: str | os.PathLike, output_dir: str | os.PathLike, ignore: Any = ()
) -> list[str]:
    """Names of the tensors of the checkpoint ``source_dir`` (but ``ignore``) that ``output_dir`` lacks or holds with
    other bits (dtype, shape or any byte): after ``save_merged_packed``, with its biases ignored, none."""
    from safetensors import safe_open

    source, output = Path(source_dir), Path(output_dir)
    output_shards, _ = _checkpoint_shards(output)
    located = {}
    for shard in output_shards:
        with safe_open(output / shard, framework="pt") as handle:
            located.update({key: shard for key in handle.keys()})
    changed = []
    for shard in _checkpoint_shards(source)[0]:
        with safe_open(source / shard, framework="pt") as handle:
            for key in handle.keys():
                if key in ignore:
                    continue
                if key not in located:
                    changed.append(key)
                    continue
                before = handle.get_tensor(key)
                with safe_open(output / located[key], framework="pt") as other:
                    after = other.get_tensor(key)
                if before.dtype != after.dtype or before.shape != after.shape or not torch.equal(_bits(before), _bits(after)):
                    changed.append(key)
    return sorted(changed)
