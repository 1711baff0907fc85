"""``restorelcc compare``: RestoreLCC against LoRA on a tiny pruned Llama, with the real data, lm-eval and merging."""

import json
import math
import time

import pytest
from test_training import char_tokenizer
from tiny_models import make_tiny_model

from peft_restorelcc.cli import main
from peft_restorelcc.compare.settings import parse_methods, parse_prune

FAST = [
    "--prune", "magnitude:0.5", "--methods", "restorelcc,lora", "--tasks", "arc_easy,boolq", "--limit", "2",
    "--seeds", "0,1", "--train-steps", "2", "--batch-size", "2", "--calibration-samples", "6", "--num-pairs", "8",
    "--perplexity-passages", "2", "--eval-batch-size", "2",
]  # fmt: skip


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_model("llama", max_position_embeddings=512, initializer_range=0.3).save_pretrained(directory)
    char_tokenizer().save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def finished(model_dir, tmp_path_factory):
    """One finished comparison: its output directory and what it printed."""
    output = tmp_path_factory.mktemp("compare") / "out"
    import contextlib
    import io

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["compare", "--model", str(model_dir), "--output", str(output), *FAST]) == 0
    return output, printed.getvalue()


def test_compare_trains_both_methods_on_the_same_data_and_measures_merged_sparsity(finished):
    output, printed = finished
    report = json.loads((output / "compare.json").read_text())
    assert report["schema_version"] == 3 and set(report["methods"]) == {"restorelcc", "lora"}
    assert report["failed"] == [] and len(report["runs"]) == 4
    assert [(run["method"], run["seed"]) for run in report["runs"]] == [
        ("restorelcc", 0), ("lora", 0), ("restorelcc", 1), ("lora", 1)
    ]  # fmt: skip
    runs = {run["method"]: run for run in report["runs"]}  # the seed-1 runs
    pruned_sparsity = report["reference"]["pruned"]["sparsity"]
    assert pruned_sparsity == pytest.approx(0.5, abs=0.01)
    # Merged on a copy and measured: RestoreLCC adds biases only, LoRA's dense update fills the pruned weights.
    assert runs["restorelcc"]["sparsity_after_merge"] == pytest.approx(pruned_sparsity)
    assert runs["lora"]["sparsity_after_merge"] < pruned_sparsity
    for run in report["runs"]:
        assert run["train_steps"] == 2 and run["train_examples"] == 4 and run["data"] == "instruction-and-cloze"
        assert set(run["tasks"]) == {"arc_easy", "boolq"} and all(len(s) == 2 for s in run["items"].values())
        assert run["trainable_parameters"] > 0 and run["train_seconds"] > 0 and run["perplexity"] > 1
    assert runs["lora"]["trainable_parameters"] > runs["restorelcc"]["trainable_parameters"]
    assert "| restorelcc |" in printed and "| lora |" in printed and "| pruned |" in printed
    assert (output / "compare.png").stat().st_size > 0 and (output / "compare.md").is_file()
    assert "| merged speed | reloads |" in (output / "compare.md").read_text()


NUMBERS = ("mean_accuracy", "perplexity", "gap_recovered", "gap_recovered_stderr", "trainable_parameters",
           "trainable_percent", "sparsity_after_merge", "train_seconds", "train_steps", "train_examples", "epochs",
           "examples_seen", "seq_len", "learning_rate", "peak_rss_gib", "pruned_forward_seconds",
           "merged_forward_seconds", "merged_speed_ratio", "reload_max_abs_diff")  # fmt: skip


def test_every_run_has_every_column_finite_and_saw_the_same_data_and_steps(finished):
    report = json.loads((finished[0] / "compare.json").read_text())
    for run in report["runs"]:
        missing = [key for key in NUMBERS if not isinstance(run.get(key), (int, float))]
        assert not missing, (run["method"], run["seed"], missing)
        assert all(math.isfinite(run[key]) for key in NUMBERS) and all(math.isfinite(v) for v in run["tasks"].values())
        assert run["reloads_in_transformers"] is True and run["merged_speed_ratio"] > 0
    # A reader can check that every method saw the same data for the same number of steps.
    seen = {(run["train_steps"], run["epochs"], run["train_examples"], run["examples_seen"], run["seq_len"],
             run["data"]) for run in report["runs"]}  # fmt: skip
    assert seen == {(2, 1.0, 4, 4, 128, "instruction-and-cloze")}
    # The merged RestoreLCC model, saved by the project's export and reloaded by stock transformers, gives its logits.
    assert max(run["reload_max_abs_diff"] for run in report["runs"] if run["method"] == "restorelcc") < 1e-4
    for row in report["methods"].values():
        assert row["seeds"] == [0, 1] and row["reloads_in_transformers"] is True and row["merged_speed_ratio"] > 0
        assert row["gap_recovered_spread"] is not None and row["train_steps"] == 2 and row["examples_seen"] == 4


def test_resume_with_every_run_finished_trains_nothing(finished, capsys):
    output, _ = finished
    before = json.loads((output / "compare.json").read_text())
    # Resumed with the same settings: no model is loaded, nothing trained, the runs kept.
    args = ["compare", "--model", before["settings"]["model"], "--output", str(output), "--resume", *FAST]
    started = time.perf_counter()
    assert main(args) == 0
    assert time.perf_counter() - started < 5
    printed = capsys.readouterr().out
    assert "4 skipped" in printed and "| lora |" in printed
    after = json.loads((output / "compare.json").read_text())
    assert after["runs"] == before["runs"] and len(after["skipped"]) == 4


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--prune", "wanda:2"], "the ratio must be in (0, 1)"),
        (["--prune", "pluck:0.5"], "METHOD one of"),
        (["--prune", "sparsegpt:2:x"], "Malformed N:M pattern"),
        (["--methods", "restorelcc,qlora"], "--methods 'restorelcc,qlora'"),
        (["--tasks", "arc_easy,nosuch"], "nosuch"),
        (["--lr", "lora=fast"], "--lr"),
        (["--steps", "0"], "--train-steps (--steps) must be >= 1"),
        (["--epochs", "0"], "--epochs must be > 0"),
        (["--seq-len", "2"], "--seq-len must be >= 8"),
    ],
)
def test_bad_flags_exit_2_with_one_line_before_any_model_loads(tmp_path, capsys, flags, message):
    output = tmp_path / "out"
    # A model that does not exist: the flags must fail before anything tries to load it.
    assert main(["compare", "--model", str(tmp_path / "absent"), "--output", str(output), *flags]) == 2
    error = capsys.readouterr().err
    assert message in error and len(error.strip().splitlines()) == 1
    assert not output.exists()


def test_examples_seen_counts_the_short_last_batch_of_each_epoch():
    from peft_restorelcc.compare.runs import examples_seen

    assert examples_seen(2, 4, 2) == 4 and examples_seen(4, 4, 2) == 8  # one epoch; two
    assert examples_seen(2, 5, 2) == 4 and examples_seen(6, 5, 2) == 10 and examples_seen(3, 5, 2) == 5


def test_prune_and_methods_parse():
    assert parse_prune("wanda:0.5") == ("wanda", 0.5, None)
    assert parse_prune("sparsegpt:2:4") == ("sparsegpt", None, "2:4")
    assert parse_prune("magnitude:0.7") == ("magnitude", 0.7, None)
    assert parse_methods("restorelcc,lora,dora,ia3") == ["restorelcc", "lora", "dora", "ia3"]
    with pytest.raises(ValueError):
        parse_methods("lora,lora")


def test_the_standard_methods_are_specs_with_the_standard_recipes():
    from peft_restorelcc.compare.runs import BUILDERS, MethodSpec, standard_spec
    from peft_restorelcc.compare.settings import METHODS, CompareSettings

    settings = CompareSettings(lora_rank=4, heads=0.5, learning_rates={"lora": 1e-4}, data="instruction")
    lora, restorelcc = standard_spec("lora", settings), standard_spec("restorelcc", settings)
    assert (lora.kind, lora.rank, lora.learning_rate, lora.data, lora.distill_alpha) == ("lora", 4, 1e-4, "instruction", 0)
    assert (restorelcc.heads, restorelcc.learning_rate, restorelcc.calibration) == (0.5, METHODS["restorelcc"], "general")
    assert set(METHODS) < set(BUILDERS) and "every-weight" in BUILDERS  # a kind a spec may name, not a --methods name
    with pytest.raises(ValueError, match="kind must be one of"):
        MethodSpec(name="x", kind="prefix", learning_rate=1e-3)
    with pytest.raises(ValueError, match="distill_alpha"):
        MethodSpec(name="x", kind="lora", learning_rate=1e-3, distill_alpha=2.0)


def test_resume_runs_only_the_methods_not_yet_finished(finished, model_dir, tmp_path, capsys):
    import shutil

    output = tmp_path / "out"
    shutil.copytree(finished[0], output)
    before = json.loads((output / "compare.json").read_text())
    flags = [flag if flag != "restorelcc,lora" else "restorelcc,lora,ia3" for flag in FAST]
    assert main(["compare", "--model", str(model_dir), "--output", str(output), "--resume", *flags]) == 0
    printed = capsys.readouterr().out
    assert "training ia3 seed 0" in printed and "training lora" not in printed and "training restorelcc" not in printed
    after = json.loads((output / "compare.json").read_text())
    assert after["reference"] == before["reference"] and after["runs"][:4] == before["runs"]
    assert [run["method"] for run in after["runs"]] == ["restorelcc", "lora", "restorelcc", "lora", "ia3", "ia3"]
    assert after["methods"]["ia3"]["sparsity_after_merge"] == pytest.approx(before["reference"]["pruned"]["sparsity"])


def test_a_pruned_model_from_a_directory_is_compared_as_given(model_dir, tmp_path):
    from peft_restorelcc import pipeline
    from peft_restorelcc.pruning import save_pruned

    dense, tokenizer = pipeline.load(model_dir)
    pruned, report = pipeline.prune(dense, tokenizer, "magnitude", 0.5)
    save_pruned(pruned, tokenizer, tmp_path / "pruned", report)
    output = tmp_path / "out"
    flags = [{"restorelcc,lora": "lora", "0,1": "0"}.get(flag, flag) for flag in FAST[2:]]
    # --dense: compare's other name of --model
    args = ["compare", "--dense", str(model_dir), "--pruned", str(tmp_path / "pruned"), "--output", str(output)]
    assert main([*args, *flags]) == 0
    results = json.loads((output / "compare.json").read_text())
    assert results["pruning"]["method"] == "magnitude"
    assert results["reference"]["pruned"]["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert results["runs"][0]["sparsity_after_merge"] < results["reference"]["pruned"]["sparsity"]


def test_a_pruned_model_of_another_shape_exits_2(model_dir, tmp_path, capsys):
    other = tmp_path / "other"
    make_tiny_model("llama", hidden_size=16, intermediate_size=32).save_pretrained(other)
    char_tokenizer().save_pretrained(other)
    capsys.readouterr()  # the progress bars of saving it
    args = ["compare", "--model", str(model_dir), "--pruned", str(other), "--output", str(tmp_path / "out")]
    assert main([*args, *FAST[2:]]) == 2
    error = capsys.readouterr().err
    assert "is not a pruned copy of --model" in error and len(error.strip().splitlines()) == 1


def test_the_python_function_resumes_as_the_command_does(finished):
    from peft_restorelcc.compare import CompareSettings, compare

    output = finished[0]
    settings = CompareSettings(**json.loads((output / "compare.json").read_text())["settings"])
    messages: list[str] = []
    report = compare(settings, output, resume=True, log=messages.append)
    assert len(report["skipped"]) == 4 and "nothing to train" in messages[0]


def test_a_failed_run_is_recorded_the_others_finish_exit_1_and_resume_runs_it_again(model_dir, tmp_path, monkeypatch,
                                                                                     capsys):  # fmt: skip
    from peft_restorelcc.compare import runs as compare

    def broken(model, settings, models):
        raise RuntimeError("no adapter today")

    monkeypatch.setitem(compare.BUILDERS, "lora", broken)
    output = tmp_path / "out"
    # By epochs (the same examples for every method), with a shorter training sequence.
    flags = [*FAST[:8], "--seeds", "0", "--epochs", "2", "--train-samples", "4", "--seq-len", "64", *FAST[12:]]
    assert main(["compare", "--model", str(model_dir), "--output", str(output), *flags]) == 1
    captured = capsys.readouterr()
    assert "lora seed 0 failed: RuntimeError: no adapter today" in captured.out
    assert "failed: lora seed 0" in captured.err
    report = json.loads((output / "compare.json").read_text())
    assert report["failed"] == [{"method": "lora", "seed": 0,
                                 "error": {"type": "RuntimeError", "message": "no adapter today"}}]  # fmt: skip
    [run] = report["runs"]
    assert run["method"] == "restorelcc" and run["reloads_in_transformers"] is True
    assert (run["epochs"], run["train_examples"], run["train_steps"], run["examples_seen"], run["seq_len"]) == (
        2.0, 4, 4, 8, 64
    )  # fmt: skip
    assert "FAILED: lora seed 0: RuntimeError: no adapter today" in (output / "compare.md").read_text()

    monkeypatch.undo()  # fixed: --resume keeps the finished run and runs the failed one again
    assert main(["compare", "--model", str(model_dir), "--output", str(output), "--resume", *flags]) == 0
    printed = capsys.readouterr().out
    assert "training lora seed 0" in printed and "training restorelcc" not in printed
    report = json.loads((output / "compare.json").read_text())
    assert report["failed"] == [] and [run["method"] for run in report["runs"]] == ["restorelcc", "lora"]
    assert {(r["epochs"], r["train_steps"], r["examples_seen"], r["seq_len"]) for r in report["runs"]} == {
        (2.0, 4, 8, 64)
    }  # fmt: skip


def test_compare_takes_a_hub_id_from_the_cache(model_dir, tmp_path):
    from test_cli_hub import HUB_ID, _ok, _publish, restorelcc

    home = tmp_path / "hf-home"
    _publish(home, HUB_ID, model_dir)
    output = tmp_path / "out"
    flags = [{"restorelcc,lora": "lora", "0,1": "0"}.get(flag, flag) for flag in FAST]
    _ok(restorelcc(home, "compare", "--model", HUB_ID, "--revision", "main", "--output", str(output), "--device",
                   "cpu", *flags))  # fmt: skip
    report = json.loads((output / "compare.json").read_text())
    assert report["settings"]["model"] == HUB_ID and [run["method"] for run in report["runs"]] == ["lora"]
    assert report["runs"][0]["reloads_in_transformers"] is True
    assert json.loads((output / "pruned" / "config.json").read_text())["pruned_from"] == HUB_ID


def test_the_reload_check_reports_a_changed_model_and_a_missing_one(tmp_path):
    import torch

    from peft_restorelcc.compare.merged_checks import reload_check

    model = make_tiny_model("llama")
    model.save_pretrained(tmp_path / "saved")
    assert reload_check(model, tmp_path / "saved") == {"reloads_in_transformers": True, "reload_max_abs_diff": 0.0}
    with torch.no_grad():  # what a reload that dropped a merged bias would look like: other logits
        model.lm_head.weight.add_(0.5)
    changed = reload_check(model, tmp_path / "saved")
    assert changed["reloads_in_transformers"] is False and changed["reload_max_abs_diff"] > 0.1
    (tmp_path / "empty").mkdir()
    missing = reload_check(model, tmp_path / "empty")
    assert missing["reloads_in_transformers"] is False and "model_type" in missing["reload_error"]
