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

FAST = ["--samples", "6", "--pairs", "6", "--max-length", "40", "--batch-size", "3", "--device", "cpu"]


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
