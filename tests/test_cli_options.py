"""Shared flags: one spelling per meaning in every subcommand, old spellings kept for a release with a warning."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from peft_restorelcc.cli import build_parser, main, options

COMMANDS = ("prune", "calibrate", "train", "merge", "eval", "run", "compare")
CALIBRATE = ["calibrate", "--model", "M", "--pruned", "P", "--num-heads", "2", "--output", "O"]


def _subparser(name: str):
    return build_parser()._subparsers._group_actions[0].choices[name]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_subcommand_takes_a_model_with_a_revision_and_a_device(command):
    flags = {flag for action in _subparser(command)._actions for flag in action.option_strings}
    assert {"--model", "--revision", "--dtype"} <= flags
    assert "--device" in flags or command == "merge"  # merge runs on the CPU: it only adds biases


@pytest.mark.parametrize(
    "argv, dest, value",
    [
        (["run", "--output-dir", "X"], "output", "X"),
        (["run", "--pairs", "5"], "num_pairs", 5),
        (["calibrate", "--dense", "D", "--pruned", "P", "--num-heads", "2", "--output", "O"], "model", "D"),
        (["prune", "--model", "M", "--output", "O", "--calibration-samples", "3"], "samples", 3),
        ([*CALIBRATE, "--calibration-samples", "7"], "samples", 7),
        (["run", "--heads", "3"], "heads", 3.0),
        (["compare", "--heads", "0.5"], "heads", 0.5),
    ],
)
def test_old_spellings_still_work_and_warn_once(monkeypatch, argv, dest, value):
    monkeypatch.setattr(options, "_WARNED", set())
    with pytest.warns(FutureWarning, match="deprecated .* use --") as caught:
        args = build_parser().parse_args(argv)
    assert getattr(args, dest) == value and len(caught) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second parse in the same process stays quiet
        assert getattr(build_parser().parse_args(argv), dest) == value


@pytest.mark.parametrize("command", ["run", "compare"])
def test_the_heads_are_num_heads_as_in_calibrate(command):
    """run and compare spell the head count as calibrate does; its default and where it lands are unchanged."""
    assert build_parser().parse_args([command]).heads == 0.25
    assert build_parser().parse_args([command, "--num-heads", "4"]).heads == 4.0
    assert "--num-heads" in _subparser(command).format_help() and "--heads " not in _subparser(command).format_help()


def test_a_user_sees_the_deprecation_once_on_one_line(tmp_path):
    # A real process with Python's default warning filters, as a user runs it.
    env = {key: value for key, value in os.environ.items() if key != "PYTHONWARNINGS"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    argv = ["prune", "--model", str(tmp_path / "absent"), "--output", str(tmp_path / "out"), "--method", "magnitude",
            "--sparsity", "0.5", "--calibration-samples", "2"]  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "peft_restorelcc", *argv], env=env, capture_output=True, text=True)
    assert done.returncode == 2  # the model does not exist: one error line after the warning
    lines = done.stderr.strip().splitlines()
    assert [line for line in lines if "deprecated" in line] == [
        "restorelcc prune:0: FutureWarning: --calibration-samples is deprecated and will be removed in the next "
        "release; use --samples"
    ]
    assert len(lines) == 2 and lines[1].startswith("restorelcc prune: error:")


def test_old_spellings_are_not_in_the_help():
    text = _subparser("calibrate").format_help() + _subparser("run").format_help()
    assert "--dense" not in text and "--output-dir" not in text and "--model" in text


def test_calibrate_without_a_model_is_one_clear_line(tmp_path, capsys):
    argv = ["calibrate", "--pruned", str(tmp_path), "--num-heads", "2", "--output", str(tmp_path / "out")]
    assert main(argv) == 2
    assert "required: --model" in capsys.readouterr().err
