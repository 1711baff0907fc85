"""``restorelcc compare`` with masked LoRA and the unmerged serving cost, on a tiny pruned Llama (real data, lm-eval and
merging): the issue's smoke command at tiny scale, the new columns, resuming a comparison of the previous schema, and
the one-line refusals of --methods."""

import contextlib
import io
import json
import shutil
import sys

import pytest
from test_compare import FAST, model_dir  # noqa: F401 - model_dir is a fixture

from peft_restorelcc.cli import main
from peft_restorelcc.compare.runs import UNTRAINED_SOURCE
from peft_restorelcc.compare.settings import parse_methods

THREE = [{"restorelcc,lora": "restorelcc,lora,masked-lora", "0,1": "0", "magnitude:0.5": "wanda:0.5"}.get(flag, flag)
         for flag in FAST]  # fmt: skip
UNMERGED = ("unmerged_forward_seconds", "unmerged_pruned_forward_seconds", "unmerged_speed_ratio")


@pytest.fixture(scope="module")
def three(model_dir, tmp_path_factory):  # noqa: F811
    """`restorelcc compare --prune wanda:0.5 --methods restorelcc,lora,masked-lora`, tiny: its output and print."""
    output = tmp_path_factory.mktemp("compare-masked") / "out"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["compare", "--model", str(model_dir), "--output", str(output), *THREE]) == 0
    return output, printed.getvalue()


def test_masked_lora_keeps_the_pruned_sparsity_after_merge_and_every_method_has_an_unmerged_speed(three):
    output, printed = three
    report = json.loads((output / "compare.json").read_text())
    assert report["schema_version"] == 3 and report["failed"] == []
    runs = {run["method"]: run for run in report["runs"]}
    assert list(runs) == ["restorelcc", "lora", "masked-lora"]
    pruned = report["reference"]["pruned"]["sparsity"]
    assert pruned == pytest.approx(0.5, abs=0.01)
    assert f"{runs['masked-lora']['sparsity_after_merge']:.4f}" == f"{pruned:.4f}"  # to 4 decimals, as the table
    assert runs["masked-lora"]["sparsity_after_merge"] == pruned  # in fact exactly
    assert runs["lora"]["sparsity_after_merge"] < pruned
    # Position by position: every zero of the pruned model is still zero after masked LoRA's and RestoreLCC's merges.
    assert runs["masked-lora"]["pruned_zeros_kept"] == 1.0 and runs["restorelcc"]["pruned_zeros_kept"] == 1.0
    assert runs["lora"]["pruned_zeros_kept"] < 0.01
    # Same modules and rank as LoRA: the same trainable parameters.
    assert runs["masked-lora"]["trainable_parameters"] == runs["lora"]["trainable_parameters"]
    assert runs["masked-lora"]["reloads_in_transformers"] is True
    for run in runs.values():
        assert all(isinstance(run[key], float) and run[key] > 0 for key in UNMERGED), run["method"]
        assert "unmerged_speed_source" not in run  # measured on the trained adapter itself
    for method in runs:
        assert report["methods"][method]["unmerged_speed_ratio"] == runs[method]["unmerged_speed_ratio"]
    table = (output / "compare.md").read_text()
    assert "| sparsity after merge | unmerged speed | merged speed | reloads |" in table
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in table.splitlines() if line.startswith("| ")}
    assert {"restorelcc", "lora", "masked-lora"} <= set(rows)
    column = rows["model"].index("unmerged speed")
    for method in runs:
        assert rows[method][column] == f"{runs[method]['unmerged_speed_ratio']:.2f}x"
    assert "| masked-lora |" in printed and "plot: " in printed


def test_a_resumed_comparison_of_the_previous_schema_keeps_its_runs_trains_only_the_new_method_and_times_the_kept_runs_unmerged(  # noqa: E501
    three, model_dir, tmp_path, capsys  # noqa: F811
):
    """As benchmarks/results/compare-gemma3-270m: a schema-2 file with finished restorelcc and lora runs (no unmerged
    speed, adapters gone), resumed with masked-lora added."""
    output = tmp_path / "out"
    shutil.copytree(three[0], output)
    shutil.rmtree(output / "work", ignore_errors=True)
    old = json.loads((output / "compare.json").read_text())
    old["schema_version"] = 2
    old["runs"] = [{key: value for key, value in run.items() if key not in UNMERGED}
                   for run in old["runs"] if run["method"] != "masked-lora"]  # fmt: skip
    for row in old["methods"].values():
        row.pop("unmerged_speed_ratio", None)
    old["methods"].pop("masked-lora")
    old["settings"]["methods"] = ["restorelcc", "lora"]
    (output / "compare.json").write_text(json.dumps(old))
    # The old table renders: no unmerged figure, shown as '-'.
    from peft_restorelcc.compare import compare_table

    assert "| - |" in compare_table(old)

    assert main(["compare", "--model", str(model_dir), "--output", str(output), "--resume", *THREE]) == 0
    printed = capsys.readouterr().out
    assert "training masked-lora seed 0" in printed
    assert "training lora" not in printed and "training restorelcc" not in printed
    assert "timing restorelcc seed 0 unmerged on an untrained adapter" in printed
    new = json.loads((output / "compare.json").read_text())
    assert new["schema_version"] == 3 and new["reference"] == old["reference"]
    assert [run["method"] for run in new["runs"]] == ["restorelcc", "lora", "masked-lora"]
    for kept, before in zip(new["runs"][:2], old["runs"]):
        assert {key: kept[key] for key in before} == before  # what was measured is kept as it was
        assert kept["unmerged_speed_source"] == UNTRAINED_SOURCE and kept["unmerged_speed_ratio"] > 0
    assert "unmerged_speed_source" not in new["runs"][2] and new["runs"][2]["unmerged_speed_ratio"] > 0
    table = (output / "compare.md").read_text()
    assert "x* |" in table and "| masked-lora |" in table  # the kept runs' figures are marked
    # Resumed again: everything measured, nothing loaded.
    assert main(["compare", "--model", str(model_dir), "--output", str(output), "--resume", *THREE]) == 0
    assert "nothing to train" in capsys.readouterr().out


@pytest.mark.parametrize(
    "methods, message",
    [
        ("restorelcc,lora,sparse-lora", "unknown method 'sparse-lora': choose from restorelcc, lora, dora, ia3, masked-lora"),
        ("lora,masked-lora,lora", "'lora' is given twice"),
        (",", "give one or more of"),
    ],
)  # fmt: skip
def test_an_unknown_or_repeated_method_is_named_in_one_line(tmp_path, capsys, methods, message):
    with pytest.raises(ValueError, match=message):
        parse_methods(methods)
    assert main(["compare", "--model", str(tmp_path / "absent"), "--output", str(tmp_path / "out"),
                 "--methods", methods]) == 2  # fmt: skip
    error = capsys.readouterr().err
    assert message in error and len(error.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_masked_lora_on_an_unpruned_model_exits_2_before_any_model_loads(model_dir, tmp_path, capsys):  # noqa: F811
    # --model does not exist: the refusal must come before anything loads it; --pruned is the unpruned tiny model.
    args = ["compare", "--model", str(tmp_path / "absent"), "--pruned", str(model_dir), "--output", str(tmp_path / "o")]
    assert main([*args, "--methods", "lora,masked-lora"]) == 2
    error = capsys.readouterr().err
    assert "masked-lora" in error and "has no zero weight" in error and len(error.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_help_lists_masked_lora(capsys):
    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "restorelcc, lora, dora, ia3, masked-lora" in text and "masked-lora 0.0005" in text


def test_without_matplotlib_compare_says_so_in_one_line(three, monkeypatch, capsys):
    output = three[0]
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError, as where it is not installed
    settings = json.loads((output / "compare.json").read_text())["settings"]
    assert main(["compare", "--model", settings["model"], "--output", str(output), "--resume", *THREE]) == 0
    printed = capsys.readouterr().out
    assert "plot: not drawn, matplotlib is not installed" in printed


def test_the_cost_benchmark_measures_masked_lora_against_lora(model_dir):  # noqa: F811
    from benchmark_scripts import load_benchmark

    row = load_benchmark("masked_lora_cost").measure(str(model_dir), repeats=1)
    lora, masked = row["methods"]["lora"], row["methods"]["masked-lora"]
    assert lora["trainable_parameters"] == masked["trainable_parameters"] > 0
    # (On this tiny model LoRA's r-wide activations of 1,024 tokens outweigh the masked updates of its 32x64 weights;
    # on the embedded models the masked updates dominate: benchmarks/results/masked-lora-cost.json.)
    assert row["adapted_weights"] == 2 * (2 * 32 * 32 + 2 * 16 * 32 + 3 * 32 * 64)  # q, o; k, v; gate, up, down
    for method in ("lora", "masked-lora"):
        measured = row["methods"][method]
        assert measured["train_memory_mb"] > 0 and measured["train_step_seconds"] > 0
        assert measured["unmerged_speed_ratio"] > 0
