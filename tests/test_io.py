"""peft_restorelcc.io: which names are Hub ids, what is downloaded, and the one line each Hub failure gives."""

from __future__ import annotations

import pytest
from huggingface_hub import errors

from peft_restorelcc.io import hub, resolve_adapter_path, resolve_model_path


@pytest.mark.parametrize("text", ["org/name", "HuggingFaceTB/SmolLM2-135M", "a-b/c.d_e"])
def test_hub_ids(text):
    assert hub.is_hub_id(text)


@pytest.mark.parametrize("text", ["name", "a/b/c", "./org/name", "~/org/name", "org//name", "/abs/path", "org/na me"])
def test_not_hub_ids(text):
    assert not hub.is_hub_id(text)


def _error(kind: type[Exception]) -> Exception:
    # The Hub's HTTP errors want a response object; the message mapping only looks at the type.
    error = kind.__new__(kind)
    Exception.__init__(error, "from the Hub")
    return error


@pytest.mark.parametrize(
    "kind, expected",
    [
        (errors.RevisionNotFoundError, "no revision 'v9'"),
        (errors.GatedRepoError, "is gated"),
        (errors.RepositoryNotFoundError, "no such model on the Hub"),
        (errors.LocalEntryNotFoundError, "org/name at revision 'v9'"),
    ],
)
def test_each_hub_failure_is_one_line(monkeypatch, kind, expected):
    def fail(*args, **kwargs):
        raise _error(kind) if kind is not errors.LocalEntryNotFoundError else kind("not cached")

    monkeypatch.setattr("huggingface_hub.snapshot_download", fail)
    with pytest.raises(ValueError) as raised:
        resolve_model_path("org/name", revision="v9")
    message = str(raised.value)
    assert expected in message and "\n" not in message


def test_a_model_download_takes_the_top_level_model_files_only(monkeypatch, tmp_path):
    calls = []

    def fake(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        (tmp_path / "model.safetensors").write_bytes(b"")
        return str(tmp_path)

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake)
    assert resolve_model_path("org/name", revision="abc") == tmp_path
    [(repo_id, kwargs)] = calls
    assert repo_id == "org/name" and kwargs["revision"] == "abc"
    assert "*.safetensors" in kwargs["allow_patterns"] and "*.bin" not in kwargs["allow_patterns"]
    assert kwargs["ignore_patterns"] == "*/*"


def test_pytorch_weights_only_when_no_safetensors(monkeypatch, tmp_path):
    calls = []

    def fake(repo_id, **kwargs):
        calls.append(kwargs["allow_patterns"])
        return str(tmp_path)

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake)
    resolve_model_path("org/name")
    assert calls[1] == ["*.bin"]


def test_adapters_resolve_locally_first(tmp_path, monkeypatch):
    # A minimal well-formed adapter (integrity.check_adapter_files refuses "{}" and missing weights).
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    import torch
    from safetensors.torch import save_file

    save_file({"lora_A.weight": torch.zeros(1)}, str(tmp_path / "adapter_model.safetensors"))
    monkeypatch.setattr("huggingface_hub.snapshot_download", lambda *a, **k: pytest.fail("looked up on the Hub"))
    assert resolve_adapter_path(tmp_path) == tmp_path
    with pytest.raises(ValueError, match="is not an adapter directory"):
        resolve_adapter_path(tmp_path / "missing")
