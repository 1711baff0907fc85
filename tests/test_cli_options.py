"""Shared flags: one spelling per meaning in every subcommand, old spellings kept for a release with a warning."""

from __future__ import annotations

import warnings

import pytest

from peft_restorelcc.cli import build_parser, main, options

COMMANDS = ("prune", "calibrate", "train", "merge", "eval", "run")


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
    ],
)
def test_old_spellings_still_work_and_warn_once(monkeypatch, capsys, argv, dest, value):
    monkeypatch.setattr(options, "_WARNED", set())
    with pytest.warns(FutureWarning, match="deprecated .* use --"):
        args = build_parser().parse_args(argv)
    assert getattr(args, dest) == value
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second parse in the same process stays quiet
        assert getattr(build_parser().parse_args(argv), dest) == value
    assert capsys.readouterr().err.count("is deprecated") == 1


def test_old_spellings_are_not_in_the_help():
    text = _subparser("calibrate").format_help() + _subparser("run").format_help()
    assert "--dense" not in text and "--output-dir" not in text and "--model" in text


def test_calibrate_without_a_model_is_one_clear_line(tmp_path, capsys):
    argv = ["calibrate", "--pruned", str(tmp_path), "--num-heads", "2", "--output", str(tmp_path / "out")]
    assert main(argv) == 2
    assert "required: --model" in capsys.readouterr().err
