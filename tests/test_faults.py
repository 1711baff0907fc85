"""Fault injection (issue 37): every bad input or fault exits with one line naming the problem, and leaves every
input file byte-identical. Tiny models in temporary directories; real subprocesses for SIGTERM/SIGINT/kill -9."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from test_cli_train import save_adapter, save_model, write_jsonl
from test_model import prune_half
from tiny_models import make_tiny_model

import peft_restorelcc  # noqa: F401  (registers the tuner)
from peft_restorelcc import RestoreLCCConfig
from peft_restorelcc.cli import main as cli_main
from peft_restorelcc.io.checks import json_safe, write_json_atomic
from peft_restorelcc.io.files import LOCK_FILE, staged_output_dir
from peft_restorelcc.training.trainer import CHECKPOINT_MARKER

REPO = Path(__file__).resolve().parents[1]
TRAIN_FAST = ["--seq-len", "32", "--batch-size", "4", "--lr", "1e-2", "--threads", "1", "--max-steps", "2"]
CALIBRATE_FAST = ["--num-heads", "2", "--samples", "6", "--num-pairs", "6", "--negatives", "jaccard",
                  "--max-length", "40", "--batch-size", "3", "--device", "cpu"]  # fmt: skip


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (relative path -> digest)."""
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """The user's files: a dense and a pruned model, an adapter, data, and broken variants of each."""
    root = tmp_path_factory.mktemp("inputs")
    pruned = save_model(root / "pruned", prune_half(make_tiny_model("llama")))
    paths = {
        "root": root,
        "pruned": pruned,
        "dense": save_model(root / "dense", make_tiny_model("llama")),
        "adapter": save_adapter(root / "adapter", pruned),
        "data": write_jsonl(root / "data.jsonl"),
    }
    nan_model = prune_half(make_tiny_model("llama"))
    with torch.no_grad():
        nan_model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    paths["nan_model"] = save_model(root / "nan_model", nan_model)
    # A "pruned" model whose only zeros sit in the last MLP: no attention output projection input changes.
    no_loss = make_tiny_model("llama")
    with torch.no_grad():
        no_loss.model.layers[-1].mlp.down_proj.weight[:, :4] = 0.0
    paths["no_loss"] = save_model(root / "no_loss", no_loss)
    paths["dense_copy"] = save_model(root / "dense_copy", make_tiny_model("llama"))
    paths["qwen2"] = save_model(root / "qwen2", prune_half(make_tiny_model("qwen2")))
    paths["three_layers"] = save_model(root / "three_layers", prune_half(make_tiny_model("llama", num_hidden_layers=3)))
    paths["five_heads"] = save_model(  # same head_dim 8, every adapter head in range: loaded silently before
        root / "five_heads",
        prune_half(make_tiny_model("llama", hidden_size=40, num_attention_heads=5, num_key_value_heads=1)),
    )
    paths["head_dim_16"] = save_model(
        root / "head_dim_16", prune_half(make_tiny_model("llama", num_attention_heads=2, num_key_value_heads=1))
    )

    def broken_adapter(name: str) -> Path:
        target = root / name
        target.mkdir()
        for file in paths["adapter"].iterdir():
            (target / file.name).write_bytes(file.read_bytes())
        return target

    weights = broken_adapter("truncated") / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    (broken_adapter("bad_json") / "adapter_config.json").write_text('{"peft_type": "RESTORELCC", ')
    (broken_adapter("empty_json") / "adapter_config.json").write_text("")
    (broken_adapter("garbage_weights") / "adapter_model.safetensors").write_bytes(b"\x00\x01not a safetensors file")
    save_file({"something.else": torch.zeros(2)}, str(broken_adapter("no_tensors") / "adapter_model.safetensors"))
    paths["latin1"] = root / "latin1.jsonl"
    paths["latin1"].write_bytes('{"prompt": "caf\xe9 ?", "response": " x"}\n'.encode("latin-1"))
    for name in ("truncated", "bad_json", "empty_json", "garbage_weights", "no_tensors"):
        paths[name] = root / name
    paths["hashes"] = root  # marker: the whole tree is hashed
    return paths


@pytest.fixture
def unchanged(inputs):
    """Asserts after the test that no input file changed a byte (nor appeared or disappeared)."""
    before = snapshot(inputs["root"])
    yield
    assert snapshot(inputs["root"]) == before


def run(argv: list[str], capsys) -> tuple[int, str]:
    """The real dispatcher in this process; returns (exit code, the error line) and checks it is one line."""
    code = cli_main([str(part) for part in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines() if "error:" in line]
    return code, lines[-1] if lines else ""


def train_argv(inputs, output, *flags, model=None, adapter=None, data=None) -> list:
    return ["train", "--model", model or inputs["pruned"], "--adapter", adapter or inputs["adapter"], "--output",
            output, "--data", data or inputs["data"], *TRAIN_FAST, *flags]  # fmt: skip


# -------------------------------------------------------------------------------------------------------- data loss


def test_resume_refuses_the_adapter_or_model_passed_in(inputs, tmp_path, capsys, unchanged) -> None:
    for target in (inputs["adapter"], inputs["pruned"]):
        code, line = run(train_argv(inputs, target, "--resume", target), capsys)
        assert code == 2 and "overlaps" in line and "training would overwrite" in line
        code, line = run(train_argv(inputs, target, "--resume"), capsys)
        assert code == 2 and "overlaps" in line


def test_resume_needs_a_checkpoint_this_tool_wrote(inputs, tmp_path, capsys, unchanged) -> None:
    # A Trainer checkpoint of another tool (trainer_state.json but no marker) is refused, and left alone.
    output = tmp_path / "run"
    foreign = output / "checkpoint-5"
    foreign.mkdir(parents=True)
    (foreign / "trainer_state.json").write_text("{}")
    before = snapshot(output)
    code, line = run(train_argv(inputs, output, "--resume"), capsys)
    assert code == 2 and CHECKPOINT_MARKER in line and "was not written by `restorelcc train`" in line
    code, line = run(train_argv(inputs, tmp_path / "elsewhere", "--resume", foreign), capsys)
    assert code == 2 and CHECKPOINT_MARKER in line
    assert snapshot(output) == before


def test_train_then_resume_its_own_checkpoint(inputs, tmp_path, capsys, unchanged) -> None:
    output = tmp_path / "run"
    assert run(train_argv(inputs, output, "--save-steps", "1"), capsys)[0] == 0
    assert (output / "checkpoint-2" / CHECKPOINT_MARKER).is_file() and not (output / LOCK_FILE).exists()
    # A checkpoint of this run resumed into another --output is refused: it would write elsewhere than it says.
    code, line = run(train_argv(inputs, tmp_path / "other", "--resume", output / "checkpoint-2"), capsys)
    assert code == 2 and "is not a checkpoint of --output" in line
    code, _ = run(train_argv(inputs, output, "--resume", "--max-steps", "3", "--save-steps", "1"), capsys)
    assert code == 0 and (output / "checkpoint-3" / CHECKPOINT_MARKER).is_file()


def test_eval_output_never_overwrites_without_overwrite(inputs, tmp_path, capsys, unchanged) -> None:
    existing = tmp_path / "results.json"
    existing.write_text("precious")
    argv = ["eval", "--model", inputs["pruned"], "--tasks", "rte", "--limit", "2", "--no-perplexity"]
    code, line = run([*argv, "--output", existing], capsys)
    assert code == 2 and "exists" in line and "--overwrite" in line
    assert existing.read_text() == "precious"
    # A file inside an input directory (here the model's own config.json) is refused even with --overwrite.
    code, line = run([*argv, "--output", inputs["pruned"] / "config.json", "--overwrite"], capsys)
    assert code == 2 and "inside the input directory" in line
    code, line = run([*argv, "--output", tmp_path], capsys)
    assert code == 2 and "is a directory" in line
    code, _ = run([*argv, "--output", existing, "--overwrite"], capsys)
    assert code == 0 and json.loads(existing.read_text())["tasks"]["rte"]


def test_results_json_never_holds_nan(tmp_path) -> None:
    assert json_safe({"a": float("nan"), "b": [1.0, float("inf")], "c": "x"}) == {"a": None, "b": [1.0, None], "c": "x"}
    path = write_json_atomic(tmp_path / "r.json", {"perplexity": float("nan")})
    assert json.loads(path.read_text(), parse_constant=lambda name: pytest.fail(name)) == {"perplexity": None}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


# Subprocess helpers: the installed entry point, with a hook that makes a stage slow enough to be interrupted.
SLOW_MERGE = """
import sys, time
import transformers
original = transformers.PreTrainedModel.save_pretrained
def slow(self, *args, **kwargs):
    result = original(self, *args, **kwargs)
    print("STAGED", flush=True)
    time.sleep(60)
    return result
transformers.PreTrainedModel.save_pretrained = slow
from peft_restorelcc.cli import main
sys.exit(main(sys.argv[1:]))
"""

SLOW_TRAIN = """
import sys, time
import peft_restorelcc.pipeline as pipeline
def slow(*args, **kwargs):
    print("TRAINING", flush=True)
    time.sleep(60)
pipeline.train = slow
from peft_restorelcc.cli import main
sys.exit(main(sys.argv[1:]))
"""


def start(script: str, argv: list, tmp_path: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script), *map(str, argv)], cwd=tmp_path, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint,
    )  # fmt: skip


def _default_sigint() -> None:
    # A shell that starts pytest in the background (`pytest &` without job control) ignores SIGINT, and children
    # inherit that: Ctrl-C must reach the child as it does a user's terminal process, whatever started pytest.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def wait_for(process: subprocess.Popen, word: str) -> None:
    deadline = time.time() + 120
    while time.time() < deadline:
        line = process.stdout.readline()
        if word in line:
            return
        if not line and process.poll() is not None:
            pytest.fail(f"process ended before {word}: {process.stderr.read()}")
    pytest.fail(f"no {word} within 120 s")


def staging_dirs(output: Path) -> list[Path]:
    return [path for path in output.parent.iterdir() if path.name.startswith(f".{output.name}.partial-")]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_an_interrupted_merge_leaves_no_staging_directory(inputs, tmp_path, sig, unchanged) -> None:
    output = tmp_path / "merged"
    argv = ["merge", "--model", inputs["pruned"], "--adapter", inputs["adapter"], "--output", output]
    process = start(SLOW_MERGE, argv, tmp_path)
    wait_for(process, "STAGED")
    assert staging_dirs(output)
    process.send_signal(sig)
    _, err = process.communicate(timeout=60)
    assert process.returncode == (143 if sig == signal.SIGTERM else 130), err
    assert "Traceback" not in err and ("terminated" in err or "interrupted" in err)
    assert not staging_dirs(output) and not output.exists()


def test_a_stale_staging_directory_from_kill_9_is_removed_by_the_next_run(inputs, tmp_path, capsys, unchanged) -> None:
    output = tmp_path / "merged"
    argv = ["merge", "--model", inputs["pruned"], "--adapter", inputs["adapter"], "--output", output]
    process = start(SLOW_MERGE, argv, tmp_path)
    wait_for(process, "STAGED")
    process.kill()
    process.communicate(timeout=60)
    (stale,) = staging_dirs(output)
    assert cli_main([str(part) for part in argv]) == 0
    assert f"removed {stale}, a staging directory left by an interrupted run" in capsys.readouterr().err
    assert not staging_dirs(output) and (output / "config.json").is_file()


def test_a_staging_directory_of_a_live_writer_is_left_alone(tmp_path) -> None:
    output = tmp_path / "out"
    with staged_output_dir(output) as mine:
        (mine / "x").write_text("1")
        with staged_output_dir(tmp_path / "out2"):  # runs the stale clean-up in the same parent
            pass
        assert mine.is_dir()
    assert (output / "x").read_text() == "1"


def test_two_trains_into_one_output_the_second_fails_at_once(inputs, tmp_path, capsys, unchanged) -> None:
    output = tmp_path / "run"
    first = start(SLOW_TRAIN, train_argv(inputs, output), tmp_path)
    wait_for(first, "TRAINING")
    assert (output / LOCK_FILE).read_text() == str(first.pid)
    started = time.perf_counter()
    code, line = run(train_argv(inputs, output, "--resume"), capsys)
    assert code == 2 and f"in use by another restorelcc process (pid {first.pid}" in line
    code, line = run(train_argv(inputs, output), capsys)
    assert code == 2 and "in use by another restorelcc process" in line
    assert time.perf_counter() - started < 30
    first.send_signal(signal.SIGTERM)
    _, err = first.communicate(timeout=60)
    assert first.returncode == 143 and "Traceback" not in err
    assert not (output / LOCK_FILE).exists()


def test_a_stale_lock_from_kill_9_is_removed_by_the_next_run(inputs, tmp_path, capsys, unchanged) -> None:
    output = tmp_path / "run"
    first = start(SLOW_TRAIN, train_argv(inputs, output), tmp_path)
    wait_for(first, "TRAINING")
    first.kill()
    first.communicate(timeout=60)
    assert (output / LOCK_FILE).exists()
    assert cli_main([str(part) for part in train_argv(inputs, output)]) == 0
    assert "removed the stale lock" in capsys.readouterr().err
    assert not (output / LOCK_FILE).exists() and (output / "adapter_model.safetensors").is_file()


# ------------------------------------------------------------------------------------------- silently wrong results


def test_merging_an_already_merged_model_is_refused(inputs, tmp_path, capsys, unchanged) -> None:
    merged = tmp_path / "merged"
    assert run(["merge", "--model", inputs["pruned"], "--adapter", inputs["adapter"], "--output", merged], capsys)[0] == 0
    assert json.loads((merged / "config.json").read_text())["restorelcc_merged"]["base_model"] == str(inputs["pruned"])
    before = snapshot(merged)
    code, line = run(["merge", "--model", merged, "--adapter", inputs["adapter"], "--output", tmp_path / "m2"], capsys)
    assert code == 2 and "already holds a merged RestoreLCC compensation" in line
    assert snapshot(merged) == before and not (tmp_path / "m2").exists()

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from peft_restorelcc.io.export import save_merged

    twice = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(merged), str(inputs["adapter"]))
    with pytest.raises(ValueError, match="already holds a merged RestoreLCC compensation"):
        save_merged(twice, tmp_path / "m3")


def test_nan_training_stops_with_one_line_and_writes_no_adapter(inputs, tmp_path, capsys, unchanged, monkeypatch):
    from peft_restorelcc.io import checks as integrity

    # The loss check itself (the up-front weight check would catch this model first): let NaN weights through.
    monkeypatch.setattr(integrity, "check_finite_weights", lambda model, what: None)
    output = tmp_path / "run"
    code, line = run(train_argv(inputs, output, model=inputs["nan_model"]), capsys)
    assert code == 2 and "the training loss is nan at step 1 (batch 0" in line and "no adapter written" in line
    assert not (output / "adapter_model.safetensors").exists() and not (output / LOCK_FILE).exists()
    monkeypatch.undo()
    code, line = run(train_argv(inputs, tmp_path / "run2", model=inputs["nan_model"]), capsys)
    assert code == 2 and "non-finite (NaN/inf) values in" in line and "down_proj" in line


def test_a_nan_gradient_stops_training(inputs, tmp_path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from peft_restorelcc.data.user import read_training_file  # noqa: F401
    from peft_restorelcc.training.trainer import NonFiniteTraining, train_adapter

    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(inputs["pruned"]), str(inputs["adapter"]), is_trainable=True
    )
    parameter = next(p for p in model.parameters() if p.requires_grad)
    parameter.register_hook(lambda grad: grad * float("inf"))
    rows = [{"input_ids": [5, 6, 7, 8], "labels": [-100, 6, 7, 8], "attention_mask": [1, 1, 1, 1]}] * 4
    with pytest.raises(NonFiniteTraining, match="non-finite gradient of .* at step 1 \\(batch 0"):
        train_adapter(model, None, rows, tmp_path / "out", max_steps=2, batch_size=2, disable_tqdm=True)
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


def test_eval_and_merge_refuse_non_finite_weights(inputs, tmp_path, capsys, unchanged) -> None:
    code, line = run(["eval", "--model", inputs["nan_model"], "--tasks", "rte", "--limit", "2", "--no-perplexity",
                      "--output", tmp_path / "r.json"], capsys)  # fmt: skip
    assert code == 2 and "non-finite (NaN/inf) values in" in line and not (tmp_path / "r.json").exists()
    argv = ["merge", "--model", inputs["nan_model"], "--adapter", inputs["adapter"], "--output", tmp_path / "m"]
    code, line = run(argv, capsys)
    assert code == 2 and "non-finite (NaN/inf) values in" in line and not (tmp_path / "m").exists()


@pytest.mark.parametrize(
    ("dense", "pruned", "message"),
    [
        ("dense", "dense", "is the same directory as --model"),
        ("dense", "dense_copy", "has no zero weight in its decoder layers"),
        ("dense", "no_loss", "loses no activation at all"),
        ("dense", "qwen2", "is a llama model but --pruned"),
        ("dense", "three_layers", "differ in their layers"),
    ],
)
def test_calibrate_refuses_mixed_up_models(inputs, tmp_path, capsys, unchanged, dense, pruned, message) -> None:
    output = tmp_path / "adapter"
    argv = ["calibrate", "--model", inputs[dense], "--pruned", inputs[pruned], "--output", output, *CALIBRATE_FAST]
    code, line = run(argv, capsys)
    assert code == 2 and message in line, line
    assert not output.exists()


def test_calibrate_allows_unpruned_models_when_asked(inputs, tmp_path, capsys, unchanged) -> None:
    output = tmp_path / "adapter"
    argv = ["calibrate", "--model", inputs["dense"], "--pruned", inputs["dense_copy"], "--output", output,
            *CALIBRATE_FAST, "--allow-unpruned"]  # fmt: skip
    assert run(argv, capsys)[0] == 0 and (output / "adapter_config.json").is_file()


def test_an_adapter_onto_another_base_is_refused(inputs, tmp_path, capsys, unchanged) -> None:
    for base, message in (
        ("head_dim_16", "head_dim"),
        ("three_layers", "attention layers"),
        ("five_heads", "[4, 4] heads per attention layer, but the base model has [5, 5]"),
    ):
        code, line = run(train_argv(inputs, tmp_path / base, model=inputs[base]), capsys)
        assert code == 2 and message in line, line
        assert not (tmp_path / base).exists()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(heads={0: []}), "heads[0] is empty"),
        (dict(heads={0: [1], 1: []}), "heads[1] is empty"),
        (dict(heads={0: [1, 1]}), "lists heads [1] more than once"),
        (dict(heads={0: [1], "0": [2]}), "names layer 0 twice"),
        (dict(heads={0: [True]}), "is not a list of integer head indices"),
        (dict(heads={0: [1.5]}), "is not a list of integer head indices"),
        (dict(heads={0: [-1]}), "negative head indices"),
        (dict(init_std=-1e-3), "init_std must be a finite number >= 0"),
        (dict(init_std=float("nan")), "init_std must be a finite number >= 0"),
        (dict(init_weights="gaussian", init_std=0.0), "init_std=0 draws nothing"),
    ],
)
def test_config_values_are_refused_not_coerced(kwargs, message) -> None:
    with pytest.raises(ValueError) as error:
        RestoreLCCConfig(**kwargs)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_out_of_range_heads_are_refused() -> None:
    from peft import get_peft_model

    with pytest.raises(ValueError, match="out of range"):
        get_peft_model(make_tiny_model("llama"), RestoreLCCConfig(heads={0: [4]}))


# ------------------------------------------------------------------------------------- crashes instead of one line


@pytest.mark.parametrize(
    ("adapter", "message"),
    [
        ("truncated", "adapter_model.safetensors is truncated"),
        ("garbage_weights", "adapter_model.safetensors is truncated or corrupt"),
        ("bad_json", "adapter_config.json is not valid JSON"),
        ("empty_json", "adapter_config.json is empty"),
        ("no_tensors", "holds none of a RestoreLCC adapter's tensors"),
    ],
)
@pytest.mark.parametrize("command", ["train", "merge", "eval"])
def test_corrupt_adapter_files_give_one_line(inputs, tmp_path, capsys, unchanged, adapter, message, command) -> None:
    output = tmp_path / "out"
    argv = {
        "train": train_argv(inputs, output, adapter=inputs[adapter]),
        "merge": ["merge", "--model", inputs["pruned"], "--adapter", inputs[adapter], "--output", output],
        "eval": ["eval", "--model", inputs["pruned"], "--adapter", inputs[adapter], "--tasks", "rte", "--limit", "2",
                 "--no-perplexity", "--output", output / "r.json"],
    }[command]  # fmt: skip
    code, line = run(argv, capsys)
    assert code == 2 and message in line and str(inputs[adapter]) in line, line
    assert not output.exists()


def test_non_utf8_data_gives_one_line(inputs, tmp_path, capsys, unchanged) -> None:
    output = tmp_path / "out"
    code, line = run(train_argv(inputs, output, data=inputs["latin1"]), capsys)
    assert code == 2 and "is not UTF-8 text (byte 0xe9 at line 1)" in line and str(inputs["latin1"]) in line
    assert not output.exists()


def test_a_mistyped_relative_path_says_it_is_not_a_local_directory(inputs, tmp_path, capsys, monkeypatch) -> None:
    from peft_restorelcc.io import adapters, models

    def offline(repo_id, *args, **kwargs):
        raise ValueError(f"{repo_id}: the Hub could not be reached and the model is not in the Hugging Face cache.")

    monkeypatch.setattr(adapters, "download_snapshot", offline)
    monkeypatch.setattr(models, "download_snapshot", offline)
    monkeypatch.chdir(tmp_path)
    argv = ["merge", "--model", inputs["pruned"], "--adapter", "runs/adapter", "--output", tmp_path / "m"]
    code, line = run(argv, capsys)
    assert code == 2 and "--adapter runs/adapter: no such local directory, and as a Hub id" in line
    code, line = run(["merge", "--model", "runs/pruned", "--adapter", inputs["adapter"], "--output", tmp_path / "m"],
                     capsys)  # fmt: skip
    assert code == 2 and "runs/pruned: no such local directory, and as a Hub id" in line
    for path in ("./runs/adapter", "runs/adapter/"):
        code, line = run(["merge", "--model", inputs["pruned"], "--adapter", path, "--output", tmp_path / "m"], capsys)
        assert code == 2 and "is not an adapter directory" in line
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("command", ["train", "merge", "eval"])
def test_an_adapter_tensor_of_the_wrong_shape_gives_one_line(inputs, tmp_path, capsys, command) -> None:
    from safetensors.torch import load_file

    adapter = tmp_path / "wrong_shape"
    adapter.mkdir()
    for file in inputs["adapter"].iterdir():
        (adapter / file.name).write_bytes(file.read_bytes())
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    key = next(key for key in tensors if "restorelcc_bias" in key)
    tensors[key] = torch.zeros(3, 5)
    save_file(tensors, str(adapter / "adapter_model.safetensors"))
    before = snapshot(adapter)
    output = tmp_path / "out"
    argv = {
        "train": train_argv(inputs, output, adapter=adapter),
        "merge": ["merge", "--model", inputs["pruned"], "--adapter", adapter, "--output", output],
        "eval": ["eval", "--model", inputs["pruned"], "--adapter", adapter, "--tasks", "rte", "--limit", "2",
                 "--no-perplexity", "--output", output / "r.json"],
    }[command]  # fmt: skip
    code, line = run(argv, capsys)
    assert code == 2 and f"--adapter {adapter} does not fit this base model: size mismatch for" in line, line
    assert snapshot(adapter) == before and not output.exists()


def test_a_staged_write_into_a_directory_filled_meanwhile_keeps_the_other_output(tmp_path) -> None:
    output = tmp_path / "out"
    with pytest.raises(ValueError, match="was written by another process while this one ran"):
        with staged_output_dir(output) as staging:
            (staging / "mine.txt").write_text("mine")
            output.mkdir()
            (output / "theirs.txt").write_text("theirs")
    assert [p.name for p in output.iterdir()] == ["theirs.txt"] and not staging_dirs(output)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["calibrate", *CALIBRATE_FAST[2:], "--samples", "1"], "--samples must be at least 2, got 1"),
        (["prune", "--method", "magnitude", "--sparsity", "1.0"], "sparsity=1.0 is outside [0, 1)"),
        (["prune", "--method", "magnitude", "--sparsity", "-0.1"], "sparsity=-0.1 is outside [0, 1)"),
    ],
)
def test_out_of_range_values_are_refused_with_the_range(inputs, tmp_path, capsys, unchanged, argv, message) -> None:
    output = tmp_path / "out"
    models = ["--model", inputs["dense"]] + (["--pruned", inputs["pruned"], "--num-heads", "2"] if argv[0] ==
                                             "calibrate" else [])  # fmt: skip
    code, line = run([argv[0], *models, "--output", output, *argv[1:]], capsys)
    assert code == 2 and message in line, line
    assert not output.exists()


def test_merging_an_adapter_twice_in_python_adds_it_once(inputs) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(inputs["pruned"]), str(inputs["adapter"]))
    model.merge_adapter()
    bias = model.base_model.model.model.layers[0].self_attn.o_proj.get_base_layer().bias.detach().clone()
    with pytest.warns(UserWarning, match="already merged"):
        model.merge_adapter()  # PEFT's own double-merge warning, and nothing more
    assert torch.equal(model.base_model.model.model.layers[0].self_attn.o_proj.get_base_layer().bias, bias)


@pytest.mark.parametrize("command", ["run", "compare"])
def test_run_and_compare_refuse_an_output_another_live_process_writes(tmp_path, capsys, command) -> None:
    output = tmp_path / "out"
    output.mkdir()
    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # a live process holding it
    try:
        (output / LOCK_FILE).write_text(str(writer.pid))
        extra = ["--resume"] if command == "compare" else []
        code = cli_main([command, "--model", str(tmp_path / "no-model-needed"), "--output", str(output), *extra])
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert code == 2 and f"in use by another restorelcc process (pid {writer.pid}" in line
        assert sorted(entry.name for entry in output.iterdir()) == [LOCK_FILE]  # nothing else written
    finally:
        writer.kill()
        writer.wait()
