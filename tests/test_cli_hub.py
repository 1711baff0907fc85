"""Models named by Hub id (``org/name`` with ``--revision``), from a Hub-layout cache built here, offline.

The cache is what ``huggingface_hub`` writes (``models--org--name/snapshots/<sha>/...`` and ``refs/main``); each
command runs in a subprocess whose environment alone points ``HF_HUB_CACHE`` at it and sets ``HF_HUB_OFFLINE=1``
(huggingface_hub reads both at import), so the test process and the user's settings are left as they are.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_training import char_tokenizer
from tiny_models import make_tiny_model

REPO = Path(__file__).resolve().parents[1]
SHA = "0123456789abcdef0123456789abcdef01234567"
HUB_ID = "tiny-org/tiny-llama"


@pytest.fixture(scope="module")
def hub_home(tmp_path_factory) -> Path:
    """An HF_HOME whose hub cache holds HUB_ID at commit SHA, with refs/main pointing at it."""
    home = tmp_path_factory.mktemp("hf-home")
    entry = home / "hub" / ("models--" + HUB_ID.replace("/", "--"))
    snapshot = entry / "snapshots" / SHA
    make_tiny_model("llama", max_position_embeddings=512, initializer_range=0.3).save_pretrained(snapshot)
    char_tokenizer().save_pretrained(snapshot)
    (entry / "refs").mkdir(parents=True)
    (entry / "refs" / "main").write_text(SHA)
    return home


def _publish(home: Path, repo_id: str, folder: Path) -> str:
    """Put ``folder`` into the cache at ``home`` as ``repo_id`` at commit SHA (refs/main too)."""
    entry = home / "hub" / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(folder, entry / "snapshots" / SHA, ignore=shutil.ignore_patterns("checkpoint-*"))
    (entry / "refs").mkdir(parents=True)
    (entry / "refs" / "main").write_text(SHA)
    return repo_id


def restorelcc(home: Path, *argv: str, offline: bool = True, **extra: str) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if not key.startswith("HF_")}
    env.update(HF_HOME=str(home), HF_HUB_CACHE=str(home / "hub"), PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **extra)
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    command = [sys.executable, "-m", "peft_restorelcc", *argv]
    return subprocess.run(command, env=env, capture_output=True, text=True, cwd=REPO, timeout=600)


def _ok(done: subprocess.CompletedProcess) -> None:
    assert done.returncode == 0, done.stderr[-3000:]


def test_every_command_takes_a_hub_id_at_a_revision(hub_home, tmp_path):
    run = tmp_path / "run"
    _ok(restorelcc(
        hub_home, "run", "--model", HUB_ID, "--revision", "main", "--output", str(run), "--tasks", "boolq",
        "--limit", "2", "--train-steps", "1", "--train-samples", "4", "--calibration-samples", "4", "--num-pairs",
        "4", "--prune-samples", "2", "--perplexity-passages", "1", "--batch-size", "2", "--device", "cpu",
    ))  # fmt: skip
    assert (run / "merged").is_dir() and (run / "results.json").is_file()
    # Provenance: the pruned model names the Hub id it was pruned from; the adapter names the pruned directory.
    assert json.loads((run / "pruned" / "config.json").read_text())["pruned_from"] == HUB_ID
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        (run / "pruned").resolve()
    )
    adapter = tmp_path / "adapter"
    pruned_id = _publish(hub_home, "tiny-org/tiny-pruned", run / "pruned")  # the pruned model, as if pushed
    _ok(restorelcc(
        hub_home, "calibrate", "--model", HUB_ID, "--revision", SHA, "--pruned", pruned_id, "--pruned-revision", SHA,
        "--num-heads", "2", "--output", str(adapter), "--samples", "4", "--num-pairs", "4", "--negatives", "jaccard",
        "--max-length", "40", "--batch-size", "2", "--device", "cpu",
    ))  # fmt: skip
    calibrated = json.loads((adapter / "adapter_config.json").read_text())
    assert (calibrated["base_model_name_or_path"], calibrated["revision"]) == (pruned_id, SHA)
    trained = tmp_path / "trained"
    _ok(restorelcc(
        hub_home, "train", "--model", pruned_id, "--revision", "main", "--adapter", str(adapter), "--output",
        str(trained), "--samples", "4", "--max-steps", "1", "--batch-size", "2", "--seq-len", "32", "--device", "cpu",
    ))  # fmt: skip
    assert (trained / "adapter_config.json").is_file()
    record = json.loads((trained / "restorelcc_base.json").read_text())
    assert (record["base_model_name_or_path"], record["revision"]) == (pruned_id, "main")
    adapter_id = _publish(hub_home, "tiny-org/tiny-adapter", trained)  # the trained adapter, as if pushed
    _ok(restorelcc(
        hub_home, "eval", "--model", pruned_id, "--revision", SHA, "--adapter", adapter_id, "--adapter-revision", SHA,
        "--tasks", "boolq", "--limit", "2", "--no-perplexity", "--device", "cpu",
    ))  # fmt: skip
    merged = tmp_path / "merged"
    _ok(restorelcc(hub_home, "merge", "--model", pruned_id, "--revision", "main", "--adapter", adapter_id, "--output",
                   str(merged)))  # fmt: skip
    assert (merged / "config.json").is_file()


def _one_error_line(done: subprocess.CompletedProcess, *expected: str) -> str:
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1, done.stderr
    assert all(text in lines[0] for text in expected), lines[0]
    return lines[0]


@pytest.mark.parametrize(
    "model, revision, expected",
    [
        ("tiny-org/no-such-model", None, ("tiny-org/no-such-model", "not in the Hugging Face cache", "HF_HUB_OFFLINE")),
        (HUB_ID, "no-such-branch", (HUB_ID, "no-such-branch")),
        ("not/a/hub/id", None, ("neither an embedded model", "Hub id")),
    ],
)
def test_a_bad_id_or_revision_is_one_clear_line(hub_home, tmp_path, model, revision, expected):
    argv = ["eval", "--model", model, "--tasks", "boolq", "--limit", "1", "--no-perplexity"]
    _one_error_line(restorelcc(hub_home, *argv, *(["--revision", revision] if revision else [])), *expected)


def test_an_unreachable_hub_is_one_clear_line(hub_home, tmp_path):
    # Online mode, with the endpoint on a closed local port: the download fails at once, on any machine.
    done = restorelcc(
        hub_home, "prune", "--model", "tiny-org/not-cached", "--method", "magnitude", "--sparsity", "0.5", "--output",
        str(tmp_path / "pruned"), offline=False, HF_ENDPOINT="http://127.0.0.1:9",
    )  # fmt: skip
    _one_error_line(done, "tiny-org/not-cached", "could not be reached")


def test_an_existing_local_directory_is_never_looked_up_on_the_hub(hub_home, tmp_path, monkeypatch):
    # A relative path that also reads as org/name: the local folder wins, and nothing asks the Hub.
    local = tmp_path / "tiny-org" / "tiny-llama"
    make_tiny_model("llama").save_pretrained(local)
    monkeypatch.chdir(tmp_path)
    from peft_restorelcc.io import resolve_model_path

    def no_hub(*args, **kwargs):
        raise AssertionError("looked up on the Hub")

    monkeypatch.setattr("peft_restorelcc.io.models.download_snapshot", no_hub)
    assert resolve_model_path(HUB_ID) == Path(HUB_ID)
    assert (resolve_model_path(HUB_ID) / "config.json").is_file()
