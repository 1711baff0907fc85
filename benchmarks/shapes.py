"""The Llama shapes the benchmarks build with random weights, written once: the released models' sizes that
``scaling.py`` walks, the SmolLM2-135M shape that ``overhead.py`` and ``serving_throughput_vllm.py`` time, and the tiny
shapes of the tests and of ``serving_vllm.py``'s families.

    llama_config("1b")                 # the release's LlamaConfig (rope scaling, token ids), for from_config
    shape_sizes("serving")             # the sizes alone, for another family's config (AutoConfig.for_model)
    smollm2_shaped_model(seed)         # SmolLM2-135M's shape, random weights, fp32, eval mode
"""

from __future__ import annotations

from typing import Any

# torch and transformers are imported where a model is built: scaling.py's parent process reads SHAPES alone.

_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 32.0,
    "high_freq_factor": 4.0,
    "low_freq_factor": 1.0,
    "original_max_position_embeddings": 8192,
}
# The released configs' shapes (config.json of each model); "tiny" is for tests of scaling.py, "serving" is
# serving_vllm.py's families (2 layers, 4 query heads of head_dim 32, 2 key/value heads).
SHAPES: dict[str, dict[str, Any]] = {
    "tiny": dict(
        model="tiny",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    ),
    "135m": dict(
        model="HuggingFaceTB/SmolLM2-135M",
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        max_position_embeddings=8192,
        rope_theta=100000.0,
        tie_word_embeddings=True,
    ),
    "360m": dict(
        model="HuggingFaceTB/SmolLM2-360M",
        hidden_size=960,
        intermediate_size=2560,
        num_hidden_layers=32,
        num_attention_heads=15,
        num_key_value_heads=5,
        vocab_size=49152,
        max_position_embeddings=8192,
        rope_theta=100000.0,
        tie_word_embeddings=True,
    ),
    "1b": dict(
        model="meta-llama/Llama-3.2-1B",
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        vocab_size=128256,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        rope_scaling=_LLAMA3_ROPE,
        tie_word_embeddings=True,
    ),
    "3b": dict(
        model="meta-llama/Llama-3.2-3B",
        hidden_size=3072,
        intermediate_size=8192,
        num_hidden_layers=28,
        num_attention_heads=24,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=128256,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        rope_scaling=_LLAMA3_ROPE,
        tie_word_embeddings=True,
    ),
    "7b": dict(
        model="meta-llama/Llama-2-7b-hf",
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
        max_position_embeddings=4096,
        rope_theta=10000.0,
        tie_word_embeddings=False,
    ),
    "serving": dict(
        model="serving",
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
    ),
}
# The fields of a shape that size the model (not the release's position range, rope or tying).
SIZE_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
)


def shape_sizes(shape: str) -> dict[str, Any]:
    """The sizes of ``shape`` (the fields of ``SIZE_FIELDS`` it sets), for any decoder family's config."""
    return {key: value for key, value in SHAPES[shape].items() if key in SIZE_FIELDS}


def llama_config(shape: str):
    """The release's ``LlamaConfig`` of ``shape``: its sizes, position range, rope and tying, Llama's token ids."""
    from transformers import LlamaConfig

    settings = {key: value for key, value in SHAPES[shape].items() if key != "model"}
    rope = {"rope_theta": settings.pop("rope_theta", 10000.0)}
    scaling = settings.pop("rope_scaling", None)
    rope.update(scaling or {"rope_type": "default"})
    return LlamaConfig(
        **settings, rope_parameters=rope, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0
    )


def smollm2_shaped_model(seed: int = 0):
    """SmolLM2-135M's sizes with random weights (seed ``seed``), tied embeddings, 2,048 positions, fp32, eval mode:
    a ``LlamaForCausalLM``, what the timing benchmarks run (speed does not depend on the weights)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape_sizes("135m"), head_dim=64, max_position_embeddings=2048, tie_word_embeddings=True)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()
