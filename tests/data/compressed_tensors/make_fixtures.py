"""Writes the compressed-tensors fixtures of tests/test_compressed.py with the real compressed-tensors compressors.

The sparse formats (``sparse-bitmask``, ``sparse-24-bitmask``) are written by compressed-tensors up to 0.14.0.1 only:
0.15 removed their compressors, and transformers 5 needs compressed-tensors >= 0.15, so no version installs beside
this project's pins that can write them. This script therefore runs the last release that can, unpacked beside the
installed packages (its compressors are plain torch; its transformers<5 pin does not matter to them):

    pip download compressed-tensors==0.14.0.1 --no-deps -d /tmp/ct014 && unzip -q /tmp/ct014/*.whl -d /tmp/ct014/x
    PYTHONPATH=/tmp/ct014/x:.:tests python tests/data/compressed_tensors/make_fixtures.py

It writes three tiny bf16 Llama models (tests/tiny_models.py, seed 0) pruned by magnitude: ``plain/`` (50%
unstructured, dense safetensors, the reference), ``bitmask/`` (the same model, sparse-bitmask) and ``sparse24/``
(2:4, sparse-24-bitmask) with ``plain24/`` its dense reference. The config's ``quantization_config`` is what
llm-compressor's ``save_pretrained`` writes: compressed-tensors' ``ModelCompressor.update_config``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import compressed_tensors
import torch
from compressed_tensors.compressors import ModelCompressor
from compressed_tensors.config import BitmaskConfig, Sparse24BitMaskConfig
from safetensors.torch import save_file
from tiny_models import make_tiny_model

from peft_restorelcc.pruning import measure_sparsity, prune_model

HERE = Path(__file__).resolve().parent


def pruned(pattern: str | None):
    model = make_tiny_model("llama").to(torch.bfloat16)
    prune_model(model, "magnitude", None if pattern else 0.5, pattern=pattern, progress=False)
    return model


def write(model, name: str, sparsity_config) -> None:
    target = HERE / name
    shutil.rmtree(target, ignore_errors=True)
    model.save_pretrained(target)
    compressor = ModelCompressor.from_pretrained_model(model, sparsity_config_or_format=sparsity_config)
    state = compressor.compress(model)
    (target / "model.safetensors").unlink()
    save_file({key: value.contiguous() for key, value in state.items()}, target / "model.safetensors", {"format": "pt"})
    compressor.update_config(target)


def main() -> None:
    assert compressed_tensors.__version__.startswith("0.14"), "run with compressed-tensors 0.14 (see the docstring)"
    for name, pattern, config_class, structure in (
        ("bitmask", None, BitmaskConfig, "unstructured"),
        ("sparse24", "2:4", Sparse24BitMaskConfig, "2:4"),
    ):
        model = pruned(pattern)
        reference = "plain" if pattern is None else "plain24"
        shutil.rmtree(HERE / reference, ignore_errors=True)
        model.save_pretrained(HERE / reference)
        sparsity = measure_sparsity(model)["overall_sparsity"]
        # What llm-compressor records: every Linear but the LM head, the measured sparsity and its structure.
        config = config_class(
            targets=["Linear"], ignore=["lm_head"], global_sparsity=sparsity, sparsity_structure=structure
        )
        write(model, name, config)
        print(f"wrote {HERE / name} and {HERE / reference} (sparsity {sparsity:.3f}, {structure})")


if __name__ == "__main__":
    main()
