"""Save a merged model of a family without an ``o_proj`` bias switch as the exactly equivalent Llama.

Qwen2/Qwen2.5, Mistral and Phi-3 hard-code their attention output projection without a bias, so a merged RestoreLCC
compensation (an ``o_proj`` bias) is dropped by any stock loader of those architectures. Their decoder is, field for
field, a Llama decoder (checked against transformers 5.2x's modeling files, see the notes per family below), and
``LlamaConfig(attention_bias=True)`` builds q/k/v/o projections that all carry a bias. So the merged model is written
as ``LlamaForCausalLM`` with:

- Qwen2: its q/k/v biases kept, ``o_proj`` bias = the compensation;
- Mistral: zero q/k/v biases, ``o_proj`` bias = the compensation;
- Phi-3: the fused ``qkv_proj`` and ``gate_up_proj`` split into Llama's q/k/v and gate/up rows (a copy of rows, so
  every stored zero stays a zero), zero q/k/v biases.

Every config field of the source is either carried over (same meaning in Llama), checked (must hold a value under
which the two architectures compute the same thing), ignored with a reason (training-only dropout, storage
metadata), or the conversion is refused with one line naming the field. Nothing is guessed: after building the Llama
model the conversion runs both models on the same tokens and refuses if their logits differ.

Pure functions on in-memory models: nothing here reads or writes files.
"""

from __future__ import annotations

import copy
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedConfig, PreTrainedModel
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from .compressed import is_sparsity_only

# Families that convert to Llama (when their config passes the checks below).
CONVERTIBLE = frozenset({"qwen2", "mistral", "phi3"})

# Families refused outright, with the reason and what to do instead.
REFUSED: dict[str, str] = {
    "mixtral": (
        "Mixtral is a mixture-of-experts model and transformers has no equivalent MoE architecture whose config "
        "switches on an attention output bias, so the merged compensation has nowhere to go"
    ),
}

# Config keys every PreTrainedConfig has; they mean the same thing in every architecture (or nothing for a causal
# LM's forward), so they are carried over as they are.
_METADATA_KEYS = frozenset({"architectures", "model_type", "transformers_version"})  # rewritten for Llama
# Set by some hub configs, describing the checkpoint rather than the computation: carried over as they are.
_DESCRIPTIVE_KEYS = frozenset({"tokenizer_class", "task_specific_params", "finetuning_task"})
_GENERIC_KEYS = (frozenset(PreTrainedConfig().to_dict()) - _METADATA_KEYS) | _DESCRIPTIVE_KEYS

# Keys whose meaning in LlamaConfig is the same as in the source config: copied verbatim. (``head_dim`` is set
# explicitly, ``rope_parameters`` is checked per family.)
_COPIED_KEYS = frozenset(
    {
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "hidden_act",
        "max_position_embeddings",
        "initializer_range",
        "rms_norm_eps",
        "use_cache",
        "tie_word_embeddings",
        "attention_dropout",  # attention-probability dropout: the same code path in both, inactive in eval
        "pad_token_id",
        "bos_token_id",
        "eos_token_id",
    }
)

# Keys that describe how weights were stored or quantized, not what the model computes. sparsity_config is dropped:
# the converted model is written as plain safetensors with its zeros stored, and vLLM 0.24+ refuses a config that
# carries a sparsity_config (NOTES §11).
_DROPPED_STORAGE_KEYS = frozenset({"sparsity_config"})

# Per family: keys that are checked (by _family_problem) or harmless, beyond the generic and copied ones.
_FAMILY_KEYS: dict[str, frozenset[str]] = {
    "qwen2": frozenset(
        {"rope_parameters", "use_sliding_window", "sliding_window", "max_window_layers", "layer_types", "head_dim"}
    ),
    "mistral": frozenset({"rope_parameters", "sliding_window", "head_dim", "layer_types"}),
    "phi3": frozenset(
        {
            "rope_parameters",
            "sliding_window",
            "original_max_position_embeddings",
            "resid_pdrop",
            "embd_pdrop",
            "head_dim",
        }
    ),
}

PROVENANCE_KEY = "restorelcc_merged"


def _text_config(model_or_config: Any) -> PreTrainedConfig:
    config = getattr(model_or_config, "config", model_or_config)
    getter = getattr(config, "get_text_config", None)
    return getter() if getter is not None else config


def _head_dim(config: PreTrainedConfig) -> int:
    # All three families use ``config.head_dim`` when set and hidden_size // num_attention_heads otherwise.
    explicit = getattr(config, "head_dim", None)
    return int(explicit) if explicit else int(config.hidden_size) // int(config.num_attention_heads)


def _window_problem(config: PreTrainedConfig, family: str) -> str | None:
    """Mistral and Phi-3 build a sliding-window mask whenever ``sliding_window`` is not None. A window of at least
    ``max_position_embeddings`` tokens never hides a key within the model's context, so only then is Llama's plain
    causal mask the same."""
    window = getattr(config, "sliding_window", None)
    if window is None or window >= config.max_position_embeddings:
        return None
    return (
        f"its sliding_window={window} is below max_position_embeddings={config.max_position_embeddings}, so "
        f"{family} attention hides keys older than {window} tokens and Llama attention would not"
    )


def _rope_problem(config: PreTrainedConfig, family: str) -> str | None:
    rope = dict(getattr(config, "rope_parameters", None) or {})
    partial = rope.get("partial_rotary_factor", 1.0)
    if partial != 1.0:
        # Llama's rotary embedding rotates the whole head; a partial rotary factor would be ignored.
        return f"its rope_parameters.partial_rotary_factor={partial} is not 1.0 and Llama rotates whole heads"
    if family == "phi3" and rope.get("rope_type", "default") != "default":
        # Phi-3's long-context RoPE (longrope) also reads original_max_position_embeddings, a field LlamaConfig does
        # not declare; not verified equivalent, so refused rather than guessed.
        return f"its rope_type={rope.get('rope_type')!r} (Phi-3 long-context RoPE) is not verified equivalent in Llama"
    return None


def _family_problem(config: PreTrainedConfig, family: str) -> str | None:
    if family == "qwen2":
        if getattr(config, "use_sliding_window", False) or getattr(config, "sliding_window", None) is not None:
            return (
                f"its use_sliding_window is on (sliding_window={config.sliding_window}, from layer "
                f"{getattr(config, 'max_window_layers', '?')}), and Llama attention has no sliding window"
            )
    else:
        problem = _window_problem(config, family)
        if problem:
            return problem
    layer_types = getattr(config, "layer_types", None)
    if family in ("qwen2", "mistral") and layer_types and any(kind != "full_attention" for kind in layer_types):
        kinds = sorted(set(layer_types))
        return f"its layer_types {kinds} include attention kinds other than full_attention, which Llama does not have"
    return _rope_problem(config, family)


KEEP_UNMERGED = "keep the adapter unmerged (PeftModel.from_pretrained after `import peft_restorelcc`)"


def conversion_problem(config: PreTrainedConfig) -> str | None:
    """Why a merged model with this config cannot be saved as an exactly equivalent Llama, ending with what to do
    instead (one line), or None if it can. Reads the config only, so it can refuse before any weight is loaded."""
    reason = _conversion_reason(config)
    if reason is None:
        return None
    return reason if "unmerged" in reason else f"{reason}; {KEEP_UNMERGED}"


def _conversion_reason(config: PreTrainedConfig) -> str | None:
    config = _text_config(config)
    family = getattr(config, "model_type", None)
    if family in REFUSED:
        return REFUSED[family]
    if family not in CONVERTIBLE:
        return f"RestoreLCC has no conversion for the {family!r} architecture"
    sparsity_only = is_sparsity_only(getattr(config, "quantization_config", None))
    if getattr(config, "quantization_config", None) is not None and not sparsity_only:
        return (
            "the model is quantized (quantization_config is set): merge into the unquantized pruned model, or "
            + KEEP_UNMERGED
        )
    known = _GENERIC_KEYS | _METADATA_KEYS | _COPIED_KEYS | _DROPPED_STORAGE_KEYS | _FAMILY_KEYS[family]
    if sparsity_only:  # how the zeros were stored, dropped from the merged model (export.strip_serving_blockers)
        known = known | {"quantization_config"}
    unknown = sorted(key for key in config.to_dict() if key not in known and not key.startswith("_"))
    if unknown:
        # A field this conversion has not checked could change outputs: refuse rather than guess.
        return f"its config has field(s) {unknown} that this conversion does not know how to carry into Llama"
    return _family_problem(config, family)


def llama_config_for(config: PreTrainedConfig, provenance: dict[str, Any] | None = None) -> LlamaConfig:
    """The LlamaConfig (``attention_bias=True``) computing what ``config``'s architecture computes, or ValueError."""
    config = _text_config(config)
    problem = conversion_problem(config)
    if problem is not None:
        raise ValueError(f"Cannot save the merged {config.model_type} model as an equivalent Llama: {problem}.")
    source = config.to_dict()
    settings = {key: source[key] for key in _COPIED_KEYS | _GENERIC_KEYS if key in source}
    settings.pop("_name_or_path", None)
    rope = dict(source.get("rope_parameters") or {})
    rope.pop("partial_rotary_factor", None)  # checked to be 1.0 above; Llama's RoPE has no such parameter
    if rope:
        settings["rope_parameters"] = rope
    settings.update(
        attention_bias=True,  # builds a bias on q/k/v/o: the o_proj bias carries the compensation
        mlp_bias=False,  # none of the source families has MLP biases
        pretraining_tp=1,
        head_dim=_head_dim(config),
        architectures=["LlamaForCausalLM"],
    )
    if provenance is not None:
        settings[PROVENANCE_KEY] = provenance
    try:
        return LlamaConfig(**settings)
    except (ValueError, TypeError) as error:  # e.g. Llama's check that hidden_size divides into the heads
        raise ValueError(
            f"Cannot save the merged {config.model_type} model as an equivalent Llama: LlamaConfig refuses its "
            f"settings ({error}); keep the adapter unmerged."
        ) from error


def _llama_state_dict(model: PreTrainedModel, family: str, head_dim: int) -> dict[str, torch.Tensor]:
    """The source weights under Llama's names; fused Phi-3 projections split by rows (views, no new values)."""
    config = _text_config(model)
    state = dict(model.state_dict())
    if family == "phi3":
        q_rows = config.num_attention_heads * head_dim
        kv_rows = config.num_key_value_heads * head_dim
        for name in [key for key in state if key.endswith("self_attn.qkv_proj.weight")]:
            prefix = name[: -len("qkv_proj.weight")]
            q, k, v = state.pop(name).split([q_rows, kv_rows, kv_rows], dim=0)
            state.update({prefix + "q_proj.weight": q, prefix + "k_proj.weight": k, prefix + "v_proj.weight": v})
        for name in [key for key in state if key.endswith("mlp.gate_up_proj.weight")]:
            prefix = name[: -len("gate_up_proj.weight")]
            gate, up = state.pop(name).chunk(2, dim=0)  # Phi3MLP: gate first, then up
            state.update({prefix + "gate_proj.weight": gate, prefix + "up_proj.weight": up})
    if any(key.endswith("bias") and ".mlp." in key for key in state):
        raise ValueError("Cannot save the merged model as an equivalent Llama: it has MLP biases, which Llama lacks.")
    # Llama with attention_bias=True has a bias on every attention projection: zeros where the source had none
    # (Mistral's and Phi-3's q/k/v; o_proj of layers whose heads the adapter did not touch).
    for layer in range(config.num_hidden_layers):
        prefix = f"model.layers.{layer}.self_attn."
        for projection in ("q_proj", "k_proj", "v_proj", "o_proj"):
            weight = state[prefix + projection + ".weight"]
            state.setdefault(prefix + projection + ".bias", torch.zeros(weight.shape[0], dtype=weight.dtype))
    return {name: tensor.contiguous() for name, tensor in state.items()}


@torch.no_grad()
def _check_same_logits(source: nn.Module, converted: nn.Module, vocab_size: int, max_positions: int) -> None:
    """The conversion's own proof: the same tokens give the same logits, or the conversion is refused."""
    length = min(16, max_positions)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab_size, (1, length), generator=generator)
    device = next(source.parameters()).device
    expected = source(input_ids.to(device)).logits.float()
    actual = converted(input_ids.to(device)).logits.float()
    dtype = next(source.parameters()).dtype
    # fp32 runs the same operations in the same order (Phi-3's split matmuls may round differently); half precision
    # may take other kernels for differently shaped matmuls.
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    difference = (expected - actual).abs().max().item()
    scale = max(1.0, expected.abs().max().item())
    if not difference <= tolerance * scale:
        raise ValueError(
            f"Cannot save the merged model as an equivalent Llama: the converted model's logits differ from the "
            f"source's by {difference:.3g} (tolerance {tolerance * scale:.3g}); keep the adapter unmerged."
        )


def provenance_for(
    model: PreTrainedModel, base_model: str | None = None, base_revision: str | None = None
) -> dict[str, Any]:
    """What the saved config says about where the converted model came from."""
    config = _text_config(model)
    try:
        package_version = version("peft_restorelcc")
    except PackageNotFoundError:  # running from a source tree: the provenance is still useful without it
        package_version = None
    return {
        "merged": True,
        "method": "RestoreLCC",
        "source_model_type": config.model_type,
        "source_architectures": list(getattr(model.config, "architectures", None) or [type(model).__name__]),
        "base_model": base_model if base_model is not None else (getattr(model.config, "_name_or_path", "") or None),
        "base_revision": base_revision,
        "converted_to": "llama",
        "peft_restorelcc_version": package_version,
    }


@torch.no_grad()
def convert_to_llama(
    model: PreTrainedModel,
    provenance: dict[str, Any] | None = None,
    verify: bool = True,
) -> LlamaForCausalLM:
    """The ``LlamaForCausalLM`` (``attention_bias=True``) equivalent to a merged Qwen2 / Mistral / Phi-3 causal LM.

    The returned model shares the source's weight tensors where no split was needed (no second copy of the model
    in memory); it carries the source's generation config. ``provenance`` (see ``provenance_for``) is written into
    its config under ``restorelcc_merged``. With ``verify`` both models are run on 16 tokens and a difference in
    logits refuses the conversion. Raises ValueError (one line: why, and what to do) for anything not exactly
    equivalent.
    """
    if not isinstance(model, PreTrainedModel) or not type(model).__name__.endswith("ForCausalLM"):
        raise ValueError(
            f"Cannot convert {type(model).__name__} to Llama: pass the merged causal LM (merge_and_unload() output)."
        )
    family = _text_config(model).model_type
    config = llama_config_for(model.config, provenance=provenance)
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    config.dtype = dtype
    state = _llama_state_dict(model, family, config.head_dim)
    # Built on the meta device and filled with the source's tensors (assign=True): no random initialisation, no copy.
    with torch.device("meta"):
        llama = LlamaForCausalLM(config)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = llama.load_state_dict(state, strict=False, assign=True)
    missing = [name for name in missing if not (config.tie_word_embeddings and name == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(
            f"Cannot convert the merged {family} model to Llama: weights do not map one to one (missing "
            f"{missing[:3]}, unexpected {unexpected[:3]}); keep the adapter unmerged."
        )
    if config.tie_word_embeddings:
        llama.lm_head.weight = llama.model.embed_tokens.weight
    # Non-persistent buffers (the rotary frequencies) are not in a state dict: rebuild them on the real device.
    llama.model.rotary_emb = LlamaRotaryEmbedding(config=config).to(device)
    source_rotary = getattr(getattr(model, "model", None), "rotary_emb", None)
    for name, buffer in list(llama.model.rotary_emb.named_buffers()):
        # The source's own frequencies (same formula, same config), in the dtype the source holds them: a model cast
        # to bf16 after loading holds them in bf16, and a fresh fp32 copy would round differently.
        theirs = getattr(source_rotary, name, None)
        if isinstance(theirs, torch.Tensor) and theirs.shape == buffer.shape:
            setattr(llama.model.rotary_emb, name, theirs.clone())
    still_meta = [name for name, tensor in [*llama.named_parameters(), *llama.named_buffers()] if tensor.is_meta]
    if still_meta:
        raise ValueError(f"Cannot convert the merged {family} model to Llama: {still_meta[:3]} left unset.")
    llama.generation_config = copy.deepcopy(model.generation_config)
    llama.eval()
    if verify:
        _check_same_logits(model.eval(), llama, config.vocab_size, config.max_position_embeddings)
    return llama
