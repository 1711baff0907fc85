"""benchmarks/recovery.py: the table of rows is valid, and the runner runs, resumes and merges them on a tiny model."""

import json
import shutil

import pytest
from benchmark_scripts import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("recovery")


@pytest.fixture(scope="module")
def results():
    return load_benchmark("recovery_results")


def test_every_row_of_the_table_is_known_typed_and_buildable(bench):
    from peft_restorelcc.compare import runs as compare

    table = bench.load_table()
    # The table's kinds are compare's: every row runs through compare.run_method as a compare.MethodSpec.
    assert table and set(compare.BUILDERS) == set(bench.KIND_KEYS)
    fields = set(compare.MethodSpec.__dataclass_fields__)
    assert {key for keys in bench.KIND_KEYS.values() for key in keys} | set(bench.ROW_KEYS) - {"about"} <= fields
    assert set(bench.CALIBRATIONS) == set(compare.CALIBRATIONS)
    for name, row in table.items():
        assert set(row) == set(bench.ROW_KEYS) | set(bench.KIND_KEYS[row["kind"]]), name
        assert row["about"] and row["learning_rate"] > 0 and 0 <= row["distill_alpha"] <= 1
        spec = bench.spec_of(name, row)
        assert (spec.name, spec.kind, spec.learning_rate, spec.data) == (name, row["kind"], row["learning_rate"], row["data"])


def table_with(row: str) -> str:
    return f"defaults: {{data: instruction, distill_alpha: 0.0, calibration: general, tasks: null}}\nrows:\n{row}"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (table_with("  a: {kind: lora, about: x, learning_rate: 1.0e-3, rank: 8, target_modules: all-linear}\n"
                    "  a: {kind: ia3, about: y, learning_rate: 1.0e-3}"), "a given twice"),
        (table_with("  a: {kind: prefix, about: x, learning_rate: 1.0e-3}"), "kind must be one of"),
        (table_with("  a: {kind: ia3, about: x, learning_rate: 1.0e-3, heads: 0.5}"), "unknown key 'heads' for kind ia3"),
        (table_with("  a: {kind: ia3, about: x, learning_rate: 1e-3}"), "write 1.0e-3"),
        (table_with("  a: {kind: ia3, about: x}"), "missing learning_rate"),
        (table_with("  a: {kind: ia3, about: x, learning_rate: 1.0e-3, data: alpaca}"), "row 'a': --data 'alpaca'"),
        (table_with("  a: {kind: ia3, about: x, learning_rate: 1.0e-3, tasks: [mmlu]}"), "row 'a': tasks: unknown task(s) mmlu"),
        (table_with("  a: {kind: ia3, about: x, learning_rate: 1.0e-3, calibration: boolq}"), "calibration must be"),
        (table_with("  a: {kind: restorelcc, about: x, learning_rate: 1.0e-3, heads: 0.5, selection: best, init: paper}"),
         "selection must be one of"),
        (table_with("  a: {kind: lora, about: x, learning_rate: 1.0e-3, rank: 8.5, target_modules: all-linear}"),
         "rank must be int"),
    ],
)
def test_a_bad_table_is_refused_naming_the_row_and_key(bench, tmp_path, text, message):
    path = tmp_path / "table.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match="table.yaml") as error:
        bench.load_table(path)
    assert message in str(error.value)


def test_the_benchmarks_own_set_holds_each_pair_once_and_cuts_no_prompt(bench):
    """instruction-and-cloze-in-task: the recipe's pairs and the in-task cloze pairs, none cut at the benchmark's 320
    tokens (HellaSwag's long prompts too). The library's sets are tested with the library (tests/test_training.py)."""
    from peft_restorelcc.data import in_task_examples, instruction_examples
    from peft_restorelcc.io import load_tokenizer
    from peft_restorelcc.training.trainer import IGNORE_INDEX

    tokenizer = load_tokenizer("smollm2-135m")
    dataset = bench.training_dataset("instruction-and-cloze-in-task", tokenizer, samples=10**5, seed=2)
    prompts = [tokenizer.decode([t for t, label in zip(row["input_ids"], row["labels"]) if label == IGNORE_INDEX])
               for row in dataset]  # fmt: skip
    pairs = instruction_examples("train", seed=2) + in_task_examples("train", seed=2, form="cloze")
    assert sorted(prompts) == sorted(pair["prompt"] for pair in pairs)
    assert len(bench.training_dataset("instruction-and-cloze-in-task", tokenizer, samples=16, seed=2)) == 16


def run(seed, recipe, **extra):
    return {"seed": seed, "trainable_params": 10, "tasks": {"rte": 0.4}, "avg_acc": 0.4, "ppl": 60.0,
            "sparsity_after_merge": 0.5, "train_seconds": 1.0, "train_memory_mb": 1.0, **recipe, **extra}  # fmt: skip


def test_a_merge_keeps_runs_trained_as_the_table_says_and_names_the_others(bench, results):
    table = bench.load_table()
    lora = table["lora-instruction"]
    settings = {"model": "m", "steps": 2, "limit": 3}
    old_style = {"data": "instruction", "distill_alpha": None, "learning_rate": lora["learning_rate"]}
    rows = [{"method": "dense", "tasks": {}}, {"method": "lora-instruction", "runs": [
        run(0, {"recipe": results.recipe_of(lora)}), run(1, old_style), run(2, old_style | {"learning_rate": 1.0}),
    ]}, {"method": "restorelcc-lost_norm", "runs": [run(0, old_style)]}]  # fmt: skip
    kept, dropped = results.finished_runs([{"settings": settings, "rows": rows}], settings, table)
    assert [r["seed"] for r in kept["lora-instruction"]] == [0, 1] and kept["__reference__"][0]["method"] == "dense"
    assert dropped == ["lora-instruction seed 2", "restorelcc-lost_norm seed 0"]
    # Files measured otherwise (here fewer items per task) hold nothing to keep.
    assert results.finished_runs([{"settings": settings, "rows": rows}], settings | {"limit": 4}, table) == ({}, [])


def test_a_row_scored_on_some_of_the_tasks_gets_the_gap_over_those(results):
    """A task-specific row (``tasks: [...]`` in the table) against the dense and pruned rows' scores on its tasks."""
    dense = {"tasks": {"boolq": 0.6, "arc_easy": 0.5}, "avg_acc": 0.55, "ppl": 50.0}
    pruned = {"tasks": {"boolq": 0.4, "arc_easy": 0.3}, "avg_acc": 0.35, "ppl": 80.0, "sparsity": 0.5}
    runs = [run(seed, {}, tasks={"boolq": accuracy}, avg_acc=accuracy) for seed, accuracy in ((0, 0.5), (1, 0.55))]
    row = results.aggregate("restorelcc-boolq", runs, dense, pruned, tasks_above_chance=["arc_easy", "boolq"])
    assert row["gap_recovered"] == pytest.approx(0.625) and row["gap_recovered_above_chance"] == pytest.approx(0.625)
    assert list(row["tasks"]) == ["boolq"] and row["seeds"] == [0, 1]


def test_the_runner_runs_resumes_and_merges_rows_on_a_tiny_model(bench, tmp_path, capsys):
    """Two rows on a tiny Llama, one per shard, then a merge that loads no model; the report script reads it."""
    from test_training import char_tokenizer
    from tiny_models import make_tiny_model

    report = load_benchmark("report")
    model_dir = tmp_path / "tiny-llama"
    make_tiny_model("llama", max_position_embeddings=512, initializer_range=0.3).save_pretrained(model_dir)
    char_tokenizer().save_pretrained(model_dir)
    common = ["--model", str(model_dir), "--steps", "2", "--batch-size", "2", "--limit", "2", "--perplexity-passages",
              "2", "--prune-samples", "4", "--calibration-samples", "6", "--pairs", "8", "--device", "cpu"]  # fmt: skip

    def benchmark(*flags):
        bench.main([*common, *flags])
        return json.loads((tmp_path / flags[flags.index("--output") + 1] / "recovery.json").read_text())

    first = benchmark("--methods", "restorelcc-instruction", "--output", str(tmp_path / "a"))
    shard = benchmark("--methods", "sparse-ft-instruction", "--output", str(tmp_path / "b"),
                      "--resume-from", str(tmp_path / "a" / "recovery.json"))  # fmt: skip
    assert shard["rows"][:2] == first["rows"][:2]  # the shard reuses the dense and pruned rows, not re-measured
    # A row scored on one task (as a task-specific row will be) is one more table entry.
    table = tmp_path / "table.yaml"
    table.write_text(bench.TABLE.read_text() + "  lora-arc-easy: {kind: lora, about: LoRA scored on ARC-Easy alone,"
                     " learning_rate: 5.0e-4, tasks: [arc_easy]}\n")  # fmt: skip
    one_task = benchmark("--table", str(table), "--methods", "lora-arc-easy", "--output", str(tmp_path / "c"),
                         "--resume-from", str(tmp_path / "a" / "recovery.json"))["rows"][-1]  # fmt: skip
    assert one_task["method"] == "lora-arc-easy" and list(one_task["tasks"]) == ["arc_easy"]
    assert one_task["runs"][0]["recipe"]["tasks"] == ["arc_easy"] and "| lora-arc-easy |" in (tmp_path / "c" / "recovery.md").read_text()
    shutil.rmtree(model_dir)  # a merge is bookkeeping: it loads no model
    merged = benchmark("--merge-only", "--paired-with", "restorelcc-instruction", "--output", str(tmp_path / "m"),
                       "--resume-from", str(tmp_path / "a" / "recovery.json"), str(tmp_path / "b" / "recovery.json"))
    rows = {row["method"]: row for row in merged["rows"]}
    assert list(rows) == ["dense", "pruned", "restorelcc-instruction", "sparse-ft-instruction"]
    restorelcc, every_weight = rows["restorelcc-instruction"], rows["sparse-ft-instruction"]
    assert restorelcc["runs"] == first["rows"][2]["runs"] and every_weight["runs"] == shard["rows"][3]["runs"]
    # Each run trained as its row says, on the pruned row's weights, and kept its items for paired errors.
    (run,) = restorelcc["runs"]
    assert run["recipe"]["learning_rate"] == bench.load_table()["restorelcc-instruction"]["learning_rate"]
    assert run["pruned_weights_sha256"] == rows["pruned"]["weights_sha256"] != rows["dense"]["weights_sha256"]
    assert {task: len(scores) for task, scores in run["items"].items()} == {task: 2 for task in run["tasks"]}
    # RestoreLCC merges into a bias and every weight trains in place: both keep the pruned model's sparsity.
    assert restorelcc["sparsity_after_merge"] == pytest.approx(rows["pruned"]["sparsity"], abs=1e-6)
    assert every_weight["sparsity_after_merge"] == pytest.approx(rows["pruned"]["sparsity"], abs=1e-6)
    assert every_weight["trainable_params"] > 100 * restorelcc["trainable_params"]
    assert set(merged["paired_with"]["differences"]) == {"dense", "pruned", "sparse-ft-instruction"}
    assert len(merged["commands"]) == 3 and merged["commands"][-1].startswith("python benchmarks/recovery.py")
    # The report script renders it: its path, its commands, its rows.
    section = report.section(tmp_path / "m" / "recovery.json", merged)
    assert all(command in section for command in merged["commands"]) and "| sparse-ft-instruction | " in section
    assert (tmp_path / "m" / "recovery.md").read_text() == report.markdown_table(merged) + "\n"
    # And the plot of the merged rows, drawn from the same file.
    assert (tmp_path / "m" / "recovery.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    # Measured otherwise: nothing to merge, a clear error and nothing written.
    with pytest.raises(SystemExit, match="no dense and pruned rows measured with these settings"):
        benchmark("--merge-only", "--limit", "3", "--output", str(tmp_path / "none"),
                  "--resume-from", str(tmp_path / "m" / "recovery.json"))  # fmt: skip
    assert not (tmp_path / "none").exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--pattern", "2x4"], "Malformed N:M pattern '2x4'"),
        (["--methods", "lora,restorelcc-random"], "unknown rows ['restorelcc-random']"),
        (["--paired-with", "restorelcc-instructions"], "--paired-with: unknown row 'restorelcc-instructions'"),
        (["--methods", "restorelcc-instruction-and-cloze-in-task", "--limit", "301"], "--limit 301 would score"),
    ],
)
def test_bad_flags_are_named_before_any_model_loads(bench, tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit):
        bench.main(["--model", str(tmp_path / "no-model"), *flags, "--output", str(tmp_path / "out")])
    assert message in capsys.readouterr().err and not (tmp_path / "out").exists()
