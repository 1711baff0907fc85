"""Tasks beyond the bundled seven: lm-eval's registry and the user's own task YAMLs (``--include-path``).

A task YAML written here, reading a JSON-lines file of its own (``dataset_path: json``), stands in for a task whose
dataset lm-eval would download: it goes through the same path (lm-eval's TaskManager, its own task definition and
dataset loading), with nothing to download.
"""

from __future__ import annotations

import contextlib
import io
import json

import datasets
import pytest
from test_evaluation import make_eval_model, make_tiny_tokenizer
from test_training import char_tokenizer
from tiny_models import make_tiny_model

from peft_restorelcc.cli import main
from peft_restorelcc.evaluation import statistics as recovery
from peft_restorelcc.evaluation.choices import PAPER_TASKS
from peft_restorelcc.evaluation.tasks import chance_accuracy, evaluate_tasks, resolve_tasks

TASK = "tiny_sky_quiz"
ITEMS = 6

_QUESTIONS = [
    ("Is the sky blue?", ["yes", "no"], 0),
    ("Is the sea dry?", ["yes", "no"], 1),
    ("Which is a fox?", ["an animal", "a rock", "a star"], 0),
    ("Do fish swim?", ["yes", "no"], 0),
    ("Is fire cold?", ["yes", "no"], 1),
    ("Which one is a colour?", ["table", "red"], 1),
]


def write_task(folder, name: str = TASK, metrics: tuple[str, ...] = ("acc", "acc_norm")) -> None:
    """A multiple-choice lm-eval task YAML in ``folder`` reading a JSON-lines file next to it."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "label": a}) + "\n" for q, c, a in _QUESTIONS))
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    validation: {data}\n"
        "output_type: multiple_choice\n"
        "validation_split: validation\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\n'
        "doc_to_target: label\n"
        'doc_to_choice: "{{choices}}"\n'
        "metric_list:\n"
        + "".join(f"  - metric: {metric}\n    aggregation: mean\n    higher_is_better: true\n" for metric in metrics)
        + "metadata:\n  version: 1.0\n"
    )


@pytest.fixture(autouse=True)
def datasets_cache_in_tmp(tmp_path, monkeypatch):
    """lm-eval's json loader prepares its dataset in datasets' cache: keep it out of the user's."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("my-tasks")
    write_task(folder)
    return folder


def test_own_task_through_include_path_gives_accuracy_and_per_item_scores(tasks_dir) -> None:
    results = evaluate_tasks(
        make_eval_model(), make_tiny_tokenizer(), tasks=[TASK, "rte"], limit=ITEMS, batch_size=4, per_item=True,
        include_path=tasks_dir,
    )  # fmt: skip
    assert list(results["tasks"]) == [TASK, "rte"]
    assert results["num_items"] == {TASK: ITEMS, "rte": ITEMS}
    scores = results["tasks"][TASK]
    assert {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"} <= set(scores)
    for metric in ("acc", "acc_norm"):
        items = results["items"][TASK][metric]
        assert len(items) == ITEMS and set(items) <= {"0", "1"}
        assert items.count("1") / ITEMS == pytest.approx(scores[metric])
    # The same result layout as the bundled tasks': headline metric, mean, per-item scores.
    assert recovery.headline_metric(scores) == "acc_norm"
    assert recovery.headline_accuracy(results) == pytest.approx((scores["acc_norm"] + results["tasks"]["rte"]["acc_norm"]) / 2)
    assert set(recovery.headline_items(results)) == {TASK, "rte"}
    # Its chance level is not known here: left out of the above-chance selection, not an error.
    assert chance_accuracy(TASK) is None
    assert recovery.tasks_above_chance({TASK: 1.0}, {TASK: None}, {TASK: ITEMS}) == []


def test_a_task_scored_by_acc_alone_reports_acc_norm_equal_to_acc(tmp_path) -> None:
    """As MMLU is: the same four numbers and per-item strings as every task, acc_norm equal to acc (as WinoGrande)."""
    write_task(tmp_path / "acc-only", "tiny_acc_only", metrics=("acc",))
    results = evaluate_tasks(
        make_eval_model(), make_tiny_tokenizer(), tasks=["tiny_acc_only"], limit=3, batch_size=4, per_item=True,
        include_path=tmp_path / "acc-only",
    )  # fmt: skip
    scores = results["tasks"]["tiny_acc_only"]
    assert scores["acc_norm"] == scores["acc"] and scores["acc_norm_stderr"] == scores["acc_stderr"]
    assert results["items"]["tiny_acc_only"]["acc_norm"] == results["items"]["tiny_acc_only"]["acc"]
    assert len(results["items"]["tiny_acc_only"]["acc"]) == 3


def test_task_names_resolve_before_any_model(tasks_dir) -> None:
    assert resolve_tasks(["paper-bundled"]) == list(PAPER_TASKS)
    # The user's folder alone answers for its own tasks (no scan of lm-eval's YAMLs needed).
    assert resolve_tasks([TASK, "boolq"], tasks_dir) == [TASK, "boolq"]
    with pytest.raises(ValueError, match="unknown task.*no_such_task.*lm-eval ls tasks"):
        resolve_tasks(["no_such_task"], tasks_dir)
    with pytest.raises(ValueError, match="--include-path"):
        resolve_tasks([TASK], tasks_dir / "absent")


def test_lm_eval_registry_names_are_known_groups_and_generation_tasks_refused() -> None:
    # lm-eval's own tasks resolve by name (nothing is loaded or downloaded to check them).
    assert resolve_tasks(["piqa", "arc_easy"]) == ["piqa", "arc_easy"]
    with pytest.raises(ValueError, match="'mmlu' is an lm-eval group"):
        resolve_tasks(["mmlu"])
    with pytest.raises(ValueError, match="'gsm8k' is not scored by accuracy"):
        resolve_tasks(["gsm8k"])


def test_cli_eval_with_include_path_and_unknown_task(tmp_path, tasks_dir, capsys) -> None:
    model_dir = tmp_path / "model"
    make_eval_model().save_pretrained(model_dir)
    make_tiny_tokenizer().save_pretrained(model_dir)
    output = tmp_path / "results.json"
    common = ["eval", "--model", str(model_dir), "--include-path", str(tasks_dir), "--no-perplexity"]
    assert main([*common, "--tasks", TASK, "--limit", "4", "--batch-size", "4", "--output", str(output)]) == 0
    results = json.loads(output.read_text())
    assert results["num_items"] == {TASK: 4} and 0.0 <= results["tasks"][TASK]["acc"] <= 1.0
    capsys.readouterr()
    assert main([*common, "--tasks", f"{TASK},no_such_task"]) == 2
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 1
    assert "no_such_task" in error and "lm-eval ls tasks" in error and error.startswith("restorelcc eval: error:")


def test_cli_run_refuses_an_unknown_task_before_any_model_loads(tmp_path, capsys) -> None:
    output = tmp_path / "out"
    assert main(["run", "--model", str(tmp_path / "absent"), "--output", str(output), "--tasks", "no_such_task"]) == 2
    error = capsys.readouterr().err
    assert "no_such_task" in error and len(error.strip().splitlines()) == 1
    assert not output.exists()


def test_compare_on_an_own_task(tmp_path, tasks_dir) -> None:
    model_dir = tmp_path / "tiny-llama"
    make_tiny_model("llama", max_position_embeddings=512, initializer_range=0.3).save_pretrained(model_dir)
    char_tokenizer().save_pretrained(model_dir)
    output = tmp_path / "compare"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main([
            "compare", "--model", str(model_dir), "--output", str(output), "--prune", "magnitude:0.5",
            "--methods", "restorelcc", "--tasks", f"{TASK},arc_easy", "--include-path", str(tasks_dir),
            "--limit", "4", "--train-steps", "2", "--batch-size", "2", "--calibration-samples", "6",
            "--num-pairs", "8", "--perplexity-passages", "2", "--eval-batch-size", "2",
        ])  # fmt: skip
    assert code == 0
    report = json.loads((output / "compare.json").read_text())
    assert report["settings"]["include_path"] == str(tasks_dir)
    for row in (report["reference"]["dense"], report["reference"]["pruned"], *report["runs"]):
        assert set(row["tasks"]) == {TASK, "arc_easy"} and len(row["items"][TASK]) == 4
    assert f"| model | {TASK} | arc_easy | mean |" in printed.getvalue()
