"""``restorelcc compare``: RestoreLCC against LoRA on a tiny pruned Llama, with the real data, lm-eval and merging."""

import json
import time

import pytest
from test_training import char_tokenizer
from tiny_models import make_tiny_model

from peft_restorelcc.cli import main
from peft_restorelcc.compare import parse_methods, parse_prune

FAST = [
    "--prune", "magnitude:0.5", "--methods", "restorelcc,lora", "--tasks", "arc_easy,boolq", "--limit", "2",
    "--train-steps", "2", "--batch-size", "2", "--calibration-samples", "6", "--num-pairs", "8",
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
    report = json.loads((output / "results.json").read_text())
    assert report["schema_version"] == 1 and set(report["methods"]) == {"restorelcc", "lora"}
    runs = {run["method"]: run for run in report["runs"]}
    assert set(runs) == {"restorelcc", "lora"}
    pruned_sparsity = report["reference"]["pruned"]["sparsity"]
    assert pruned_sparsity == pytest.approx(0.5, abs=0.01)
    # Merged on a copy and measured: RestoreLCC adds biases only, LoRA's dense update fills the pruned weights.
    assert runs["restorelcc"]["sparsity_after_merge"] == pytest.approx(pruned_sparsity)
    assert runs["lora"]["sparsity_after_merge"] < pruned_sparsity
    for run in runs.values():
        assert run["train_steps"] == 2 and run["train_examples"] == 4 and run["data"] == "instruction-and-cloze"
        assert set(run["tasks"]) == {"arc_easy", "boolq"} and all(len(s) == 2 for s in run["items"].values())
        assert run["trainable_parameters"] > 0 and run["train_seconds"] > 0 and run["perplexity"] > 1
    assert runs["lora"]["trainable_parameters"] > runs["restorelcc"]["trainable_parameters"]
    assert "| restorelcc |" in printed and "| lora |" in printed and "| pruned |" in printed
    assert (output / "compare.png").stat().st_size > 0 and (output / "results.md").is_file()


def test_resume_with_every_run_finished_trains_nothing(finished, capsys):
    output, _ = finished
    before = json.loads((output / "results.json").read_text())
    # Resumed with the same settings: no model is loaded, nothing trained, the runs kept.
    args = ["compare", "--model", before["settings"]["model"], "--output", str(output), "--resume", *FAST]
    started = time.perf_counter()
    assert main(args) == 0
    assert time.perf_counter() - started < 5
    printed = capsys.readouterr().out
    assert "2 skipped" in printed and "| lora |" in printed
    after = json.loads((output / "results.json").read_text())
    assert after["runs"] == before["runs"] and len(after["skipped"]) == 2


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--prune", "wanda:2"], "the ratio must be in (0, 1)"),
        (["--prune", "pluck:0.5"], "METHOD one of"),
        (["--prune", "sparsegpt:2:x"], "Malformed N:M pattern"),
        (["--methods", "restorelcc,qlora"], "--methods 'restorelcc,qlora'"),
        (["--tasks", "arc_easy,nosuch"], "nosuch"),
        (["--lr", "lora=fast"], "--lr"),
    ],
)
def test_bad_flags_exit_2_with_one_line_before_any_model_loads(tmp_path, capsys, flags, message):
    output = tmp_path / "out"
    # A model that does not exist: the flags must fail before anything tries to load it.
    assert main(["compare", "--model", str(tmp_path / "absent"), "--output", str(output), *flags]) == 2
    error = capsys.readouterr().err
    assert message in error and len(error.strip().splitlines()) == 1
    assert not output.exists()


def test_prune_and_methods_parse():
    assert parse_prune("wanda:0.5") == ("wanda", 0.5, None)
    assert parse_prune("sparsegpt:2:4") == ("sparsegpt", None, "2:4")
    assert parse_prune("magnitude:0.7") == ("magnitude", 0.7, None)
    assert parse_methods("restorelcc,lora,dora,ia3") == ["restorelcc", "lora", "dora", "ia3"]
    with pytest.raises(ValueError):
        parse_methods("lora,lora")


def test_the_standard_methods_are_specs_with_the_standard_recipes():
    from peft_restorelcc.compare import BUILDERS, METHODS, CompareSettings, MethodSpec, standard_spec

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
    before = json.loads((output / "results.json").read_text())
    flags = [flag if flag != "restorelcc,lora" else "restorelcc,lora,ia3" for flag in FAST]
    assert main(["compare", "--model", str(model_dir), "--output", str(output), "--resume", *flags]) == 0
    printed = capsys.readouterr().out
    assert "training ia3 seed 0" in printed and "training lora" not in printed and "training restorelcc" not in printed
    after = json.loads((output / "results.json").read_text())
    assert after["reference"] == before["reference"] and after["runs"][:2] == before["runs"]
    assert [run["method"] for run in after["runs"]] == ["restorelcc", "lora", "ia3"]
    assert after["methods"]["ia3"]["sparsity_after_merge"] == pytest.approx(before["reference"]["pruned"]["sparsity"])


def test_a_pruned_model_from_a_directory_is_compared_as_given(model_dir, tmp_path):
    from peft_restorelcc import pipeline
    from peft_restorelcc.pruning import save_pruned

    dense, tokenizer = pipeline.load(model_dir)
    pruned, report = pipeline.prune(dense, tokenizer, "magnitude", 0.5)
    save_pruned(pruned, tokenizer, tmp_path / "pruned", report)
    output = tmp_path / "out"
    flags = [flag if flag != "restorelcc,lora" else "lora" for flag in FAST[2:]]
    args = ["compare", "--model", str(model_dir), "--pruned", str(tmp_path / "pruned"), "--output", str(output)]
    assert main([*args, *flags]) == 0
    results = json.loads((output / "results.json").read_text())
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
    from peft_restorelcc import pipeline
    from peft_restorelcc.compare import CompareSettings

    output = finished[0]
    settings = CompareSettings(**json.loads((output / "results.json").read_text())["settings"])
    messages: list[str] = []
    report = pipeline.compare(settings, output, resume=True, log=messages.append)
    assert len(report["skipped"]) == 2 and "nothing to train" in messages[0]
