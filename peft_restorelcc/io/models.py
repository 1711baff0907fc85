"""Models as users name them: the embedded default, a local directory, or a Hub id at a revision.

Resolution order: an embedded name (``assets.EMBEDDED_MODELS``), then an existing local path (never looked up on
the Hub, relative paths included), then a Hub id ``org/name`` fetched into the user's Hugging Face cache. Anything
else is one clear error. Every loader below resolves once and then reads a local folder.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .choices import QUANTIZATIONS
from .compressed import load_sparse_model, sparse_format
from .embedded import EMBEDDED_MODELS, embedded_model_path, missing_embedded_hint
from .export import is_compressed_tensors_quantized
from .hub import MODEL_PATTERNS, download_snapshot, is_hub_id


def resolve_model_path(name_or_path: str | os.PathLike, revision: str | None = None) -> Path:
    """A local model directory for ``name_or_path`` (embedded name, local directory or Hub id at ``revision``).

    An embedded name converts its GGUF file on first use; a local directory gives itself (``revision`` does not
    apply to it); a Hub id ``org/name`` is fetched with ``huggingface_hub`` into the user's cache. Raises ValueError
    with one line for anything else, naming the embedded models and how to install the missing ones.
    """
    if isinstance(name_or_path, str) and name_or_path in EMBEDDED_MODELS:
        return embedded_model_path(name_or_path)
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"{str(name_or_path)!r} is a file; a model is a directory written by save_pretrained.")
    text = str(name_or_path)
    if is_hub_id(text):
        try:
            return download_snapshot(text, revision, MODEL_PATTERNS)
        except ValueError as error:  # a mistyped relative path looks like org/name: say both
            raise ValueError(f"{text}: no such local directory, and as a Hub id: {error}") from None
    raise ValueError(
        f"{text!r} is neither an embedded model, an existing local directory, nor a Hub id (org/name). "
        f"Embedded models: {sorted(EMBEDDED_MODELS)}." + missing_embedded_hint()
    )


def model_reference(name_or_path: str | os.PathLike, resolved: str | os.PathLike) -> str:
    """How an adapter names this model as its base so that anyone can load it again: a Hub id as the user gave it
    (``resolved`` is then a cache snapshot, private to this machine), otherwise the absolute local directory (for
    an embedded name, its converted copy in the cache)."""
    text = str(name_or_path)
    if text not in EMBEDDED_MODELS and not Path(text).expanduser().exists() and is_hub_id(text):
        return text
    return str(Path(resolved).expanduser().resolve())


def name_model_source(model: Any, reference: str | os.PathLike) -> None:
    """Make ``model`` name ``reference`` as the place it was loaded from. PEFT's ``get_peft_model`` records
    ``model.name_or_path`` as the adapter's ``base_model_name_or_path``, which ``AutoPeftModelForCausalLM`` loads: a
    pruned copy of a dense model keeps the dense model's name until it is told otherwise."""
    model.name_or_path = str(reference)
    model.config._name_or_path = str(reference)


def _torch_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """None for "auto"/None (the checkpoint's own dtype), else a torch dtype ("bfloat16" -> torch.bfloat16): the
    sparse-format loader does arithmetic with it, so a CLI string must become a real dtype."""
    if dtype is None or dtype == "auto":
        return None
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16.")
    return resolved


def bitsandbytes_config(quantization: str, compute_dtype: torch.dtype | str | None = None) -> Any:
    """A ``BitsAndBytesConfig`` for one of ``QUANTIZATIONS``: ``int8`` is LLM.int8 (8-bit weights, activations
    quantized per row), ``nf4``/``fp4`` are 4-bit weights, ``-double`` also quantizes their scales. 4-bit layers
    compute in ``compute_dtype`` (default: bfloat16 on a GPU, float32 on the CPU)."""
    from transformers import BitsAndBytesConfig

    if quantization not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantization!r}; use one of {', '.join(QUANTIZATIONS)}.")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ValueError(
            f"quantization {quantization!r} needs bitsandbytes: pip install 'peft_restorelcc[quantized]'."
        ) from None
    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = _torch_dtype(compute_dtype) or (torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quantization.split("-")[0],
        bnb_4bit_use_double_quant=quantization.endswith("-double"),
        bnb_4bit_compute_dtype=compute,
    )


def load_model(
    name_or_path: str | os.PathLike,
    dtype: torch.dtype | str | None = "auto",
    device_map: str | dict | None = None,
    revision: str | None = None,
    quantization: str | None = None,
    dequantize: bool = False,
) -> PreTrainedModel:
    """A causal LM from an embedded name, a local directory or a Hub id (at ``revision``), in eval mode.

    ``dtype="auto"`` (or None) keeps the checkpoint's dtype (a bf16 model stays bf16; fp32 where none is recorded).
    ``device_map`` goes to accelerate through ``from_pretrained`` (``"auto"`` splits a model over the GPUs and
    offloads the rest to CPU/disk). A pruned model saved by llm-compressor in compressed-tensors' sparse formats
    (``sparse-bitmask``, ``sparse-24-bitmask``) is decompressed exactly (``compressed.load_sparse_model``).
    ``quantization`` (one of ``QUANTIZATIONS``) loads it quantized by bitsandbytes, placed whole on the GPU if
    there is one, else on the CPU, unless ``device_map`` says otherwise. ``dequantize`` loads a checkpoint quantized
    by compressed-tensors (llm-compressor's W4A16, W8A8, ...; ``is_compressed_tensors_quantized``) on its dequantized
    weights (``CompressedTensorsConfig(dequantize=True)``), the form RestoreLCC restores; without it such a checkpoint
    is refused with one line.
    """
    path = resolve_model_path(name_or_path, revision)
    dtype = _torch_dtype(dtype)
    if dequantize and quantization is None and is_compressed_tensors_quantized(path):
        import warnings

        from transformers import CompressedTensorsConfig

        with warnings.catch_warnings():  # "the quantization_config from the model will be used", but dequantized
            warnings.filterwarnings("ignore", message=".*already has a `quantization_config` attribute")
            model = AutoModelForCausalLM.from_pretrained(
                path,
                dtype=dtype or "auto",
                device_map=device_map,
                quantization_config=CompressedTensorsConfig(dequantize=True),
            )
        return model.eval()
    if quantization is not None:
        if sparse_format(path) is not None:
            raise ValueError(
                f"{path} is stored in a compressed-tensors sparse format; quantizing it on load is not supported: "
                "save it as plain safetensors first (restorelcc prune writes those)."
            )
        config = bitsandbytes_config(quantization, dtype)
        if device_map is None:
            device_map = {"": 0} if torch.cuda.is_available() else "cpu"
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype or "auto", device_map=device_map, quantization_config=config
        )
        return model.eval()
    if sparse_format(path) is not None:
        return load_sparse_model(path, dtype=dtype, device_map=device_map)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto", device_map=device_map)
    return model.eval()


class ModelLoader:
    """A model source that loads on demand, so that the dense and the pruned model need not be in memory at once.

    ``config`` (optional) lets the structural checks run before the model is loaded, i.e. before any forward pass
    of the other model. ``name`` goes into the calibration metadata.
    """

    def __init__(self, load: Callable[[], nn.Module], config: Any = None, name: str | None = None) -> None:
        self._load = load
        self.config = config
        self.name = name

    def __call__(self) -> nn.Module:
        return self._load()


def model_loader(
    name_or_path: str | os.PathLike,
    dtype: torch.dtype | str | None = "auto",
    device_map: str | dict | None = None,
    device: str | torch.device | None = None,
    revision: str | None = None,
) -> ModelLoader:
    """A ``ModelLoader`` that loads the model only when calibration needs it (so that the dense and
    the pruned model are never both in memory), with ``dtype`` and ``device_map`` as in :func:`load_model`, moved to
    ``device`` when there is no ``device_map``; its config is read now, so the structural checks run before any
    forward pass."""
    path = resolve_model_path(name_or_path, revision)

    def load() -> PreTrainedModel:
        model = load_model(path, dtype=dtype, device_map=device_map)
        return model.to(device) if device is not None and device_map is None else model

    return ModelLoader(load, config=AutoConfig.from_pretrained(path), name=str(name_or_path))


def load_tokenizer(name_or_path: str | os.PathLike, revision: str | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer of an embedded model, a local directory or a Hub id, always with a pad token."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(name_or_path, revision))
    if tokenizer.pad_token is None:
        # Batches (calibration, training, evaluation) need padding; the attention mask hides padded positions and
        # losses ignore them, so which token pads does not matter, and reusing EOS adds no new embedding row.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model_and_tokenizer(
    name_or_path: str | os.PathLike,
    dtype: torch.dtype | str | None = "auto",
    device_map: str | dict | None = None,
    revision: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """``(load_model(...), load_tokenizer(...))`` from one resolution of the name."""
    path = resolve_model_path(name_or_path, revision)
    return load_model(path, dtype=dtype, device_map=device_map), load_tokenizer(path)
