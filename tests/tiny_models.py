"""Tiny random transformers models of every supported architecture, built from real config classes."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

VOCAB_SIZE = 97

# Each config: 2 layers, 4 query heads of head_dim 8 (hidden 32); Llama uses GQA (2 key/value heads).
_TINY_CONFIGS: dict[str, dict] = {
    "llama": dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    ),
    "qwen2": dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    ),
    "qwen3": dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
    ),
    "mistral": dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    ),
    "gemma": dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=64,
    ),
    "phi3": dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
    ),
    "gpt_neox": dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64
    ),
    "opt": dict(
        hidden_size=32,
        ffn_dim=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        word_embed_proj_dim=32,
    ),
    "gpt2": dict(n_embd=32, n_layer=2, n_head=4, n_positions=64),
}

ARCHITECTURES = tuple(_TINY_CONFIGS)


def make_tiny_model(model_type: str = "llama", seed: int = 0, **overrides) -> PreTrainedModel:
    """A freshly initialised tiny causal LM in fp32 eval mode; the same seed gives the same weights."""
    settings = {"vocab_size": VOCAB_SIZE, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    config = AutoConfig.for_model(model_type, **{**settings, **_TINY_CONFIGS[model_type], **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    # Random init leaves biases at zero; give them values so a lost bias would show.
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):
                parameter.normal_(0, 0.02)
    return model.eval()


def random_input_ids(batch: int = 2, length: int = 12, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB_SIZE, (batch, length), generator=generator)


def grid_components(layers: int, heads: int, d: int = 2, scores: torch.Tensor | None = None):
    """Lost components of ``layers`` x ``heads`` heads with identity bases and unit means, for tests of head choice."""
    from peft_restorelcc.calibration import LostComponents

    total = layers * heads
    return LostComponents(
        layer_indices=list(range(layers)),
        heads_per_layer=[heads] * layers,
        head_dim=d,
        basis=torch.eye(d).expand(total, d, d).clone(),
        singular_values=torch.ones(total, d),
        mean=torch.ones(total, d),
        scores=scores,
    )
