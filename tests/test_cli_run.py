"""``restorelcc run``: the whole job on a tiny model, with the real data, lm-eval and every stage."""

import json

import pytest
import torch
from test_training import char_tokenizer
from tiny_models import make_tiny_model

from peft_restorelcc.cli import main

FAST = [
    "--tasks", "arc_easy,boolq", "--limit", "2", "--train-steps", "2", "--train-samples", "8",
    "--calibration-samples", "6", "--pairs", "8", "--prune-samples", "4", "--perplexity-passages", "2",
    "--batch-size", "2",
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_model("llama", max_position_embeddings=512, initializer_range=0.3).save_pretrained(directory)
    char_tokenizer().save_pretrained(directory)
    return directory


def test_run_does_every_stage_and_keeps_sparsity(model_dir, tmp_path, capsys):
    output = tmp_path / "run"
    assert main(["run", "--model", str(model_dir), "--output-dir", str(output), *FAST]) == 0
    printed = capsys.readouterr().out
    assert "| restored |" in printed and "sparsity before merge: 0.5000, after merge: 0.5000" in printed
    # Every model answered the same items: the errors printed are paired ones.
    assert "dense - pruned average accuracy: " in printed and "(paired standard error over the same items 0." in printed
    summary = json.loads((output / "results.json").read_text())
    assert summary["settings"]["data"] == "instruction-and-cloze"  # the default: the recipe's pairs and the cloze ones
    assert set(summary["results"]) == {"dense", "pruned", "restored"}
    assert all(len(result["items"]["boolq"]["acc"]) == 2 for result in summary["results"].values())
    for result in summary["results"].values():
        assert set(result["tasks"]) == {"arc_easy", "boolq"} and result["perplexity"] > 1
    assert summary["sparsity_before_merge"] == summary["sparsity_after_merge"] == pytest.approx(0.5)
    assert summary["trainable_parameters"] == 2 * 8 * sum(len(h) for h in summary["heads"].values())
    assert {"prune", "calibrate", "train", "merge"} <= set(summary["stage_seconds"])
    assert (output / "accuracy.png").stat().st_size > 0
    # The merged model reloads in stock transformers with the compensation as an o_proj bias.
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(output / "merged")
    assert merged.config.attention_bias and merged.model.layers[0].self_attn.o_proj.bias is not None
    pruned = AutoModelForCausalLM.from_pretrained(output / "pruned")
    assert torch.equal(merged.model.layers[1].mlp.down_proj.weight, pruned.model.layers[1].mlp.down_proj.weight)


def test_run_spreads_the_heads_over_the_layers_with_selection_per_layer(model_dir, tmp_path):
    from peft_restorelcc.calibration import LostComponents, select_heads

    output = tmp_path / "run"
    # Random scores of seed 3 rank heads 2 and 3 of layer 1 first: "top" would take both.
    flags = [*FAST, "--strategy", "random", "--seed", "3", "--heads", "2", "--selection", "per-layer"]
    assert main(["run", "--model", str(model_dir), "--output-dir", str(output), *flags]) == 0
    summary = json.loads((output / "results.json").read_text())
    components = LostComponents.load(output / "lost_components")
    assert select_heads(components, 2) == {1: [2, 3]}
    per_layer = {str(layer): heads for layer, heads in select_heads(components, 2, "per-layer").items()}
    assert summary["heads"] == per_layer == {"0": [2], "1": [2]}  # each layer's best head
    assert summary["settings"]["selection"] == "per-layer"


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--sparsity", "1.5"], "--sparsity must be in [0, 1)"),
        (["--num-heads", "0"], "--num-heads must be a positive"),
        (["--heads", "0"], "--num-heads must be a positive"),  # the old spelling, checked the same
        (["--train-steps", "0"], "--train-steps must be positive"),
        (["--distill-alpha", "2"], "--distill-alpha must be in [0, 1]"),
        (["--device", "gpu0"], "unknown device 'gpu0'"),
        (["--eval-batch-size", "0"], "must be 'auto' or a positive integer, got '0'"),
        (["--eval-batch-size", "many"], "must be 'auto' or a positive integer, got 'many'"),
    ],
)
def test_bad_flags_exit_2_before_any_work(model_dir, tmp_path, capsys, flags, message):
    output = tmp_path / "run"
    assert main(["run", "--model", str(model_dir), "--output-dir", str(output), *flags]) == 2
    assert message in capsys.readouterr().err
    assert not output.exists()


def test_a_non_empty_output_dir_is_refused(model_dir, tmp_path, capsys):
    (tmp_path / "mine.txt").write_text("keep")
    assert main(["run", "--model", str(model_dir), "--output-dir", str(tmp_path)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["mine.txt"]


def _scored(acc: float, items: str) -> dict:
    return {"tasks": {"rte": {"acc": acc, "acc_stderr": 0.1, "acc_norm": None}}, "items": {"rte": {"acc": items}}}


def test_results_table_gives_paired_errors_when_every_model_kept_its_items():
    from peft_restorelcc.cli.run_command import results_table

    results = {"dense": _scored(0.75, "11101101"), "pruned": _scored(0.375, "10001100"),
               "restored": _scored(0.625, "11001101")}  # fmt: skip
    summary = {"results": results, "trainable_parameters": 16, "sparsity_before_merge": 0.5,
               "sparsity_after_merge": 0.5, "stage_seconds": {"train": 1.0}}  # fmt: skip
    # dense - pruned per item: 0,1,1,0,0,0,0,1: mean 3/8, variance (3 (5/8)^2 + 5 (3/8)^2) / 7 = 15/56, over 8 items.
    paired = (15 / 56 / 8) ** 0.5
    # restored - pruned - 2/3 (dense - pruned): 0,1/3,-2/3,0,0,0,0,1/3 (mean 0, variance 2/21) over 8, over the gap.
    share_error = (2 / 21 / 8) ** 0.5 / 0.375
    table = results_table(summary)
    assert f"| 67% ± {share_error:.0%} |" in table
    assert f"(paired standard error over the same items {paired:.3f}" in table
    # Results without items (evaluated earlier, or elsewhere): the unpaired error from lm-eval's own errors.
    for result in results.values():
        del result["items"]
    assert f"(standard error {(0.1**2 + 0.1**2) ** 0.5:.3f}" in results_table(summary)


def test_results_table_gives_the_gap_over_the_tasks_the_dense_model_is_above_chance_on():
    from peft_restorelcc.cli.run_command import results_table

    def scored(rte_items: str, hellaswag_items: str) -> dict:
        accuracy = {task: scores.count("1") / len(scores) for task, scores in (("rte", rte_items),
                                                                             ("hellaswag", hellaswag_items))}  # fmt: skip
        return {
            "tasks": {task: {"acc": value, "acc_stderr": 0.1, "acc_norm": None} for task, value in accuracy.items()},
            "items": {"rte": {"acc": rte_items}, "hellaswag": {"acc": hellaswag_items}},
        }

    # RTE: the dense model at chance, the pruned one above it (a yes-bias); HellaSwag (chance 0.25): 6 of 8 right,
    # z = (0.75 - 0.25) / sqrt(0.75 * 0.25 / 8) = 3.3.
    results = {"dense": scored("10101010", "11101101"), "pruned": scored("11111100", "10001100"),
               "restored": scored("11111100", "11001101")}  # fmt: skip
    summary = {"results": results, "trainable_parameters": 16, "sparsity_before_merge": 0.5,
               "sparsity_after_merge": 0.5, "stage_seconds": {"train": 1.0}}  # fmt: skip
    table = results_table(summary)
    # Over both tasks the gap is +0.0625 (the pruned model's RTE lead eats most of its HellaSwag loss), of which the
    # restored model seems to give back 200%; over HellaSwag alone it is +0.375, and 2/3 of it comes back.
    assert "dense - pruned average accuracy: +0.062" in table and "| 200% ± " in table
    share_error = (2 / 21 / 8) ** 0.5 / 0.375  # as in the one-task test above: the same HellaSwag items
    assert f"above chance on (hellaswag): dense - pruned +0.375 (paired standard error {(15 / 56 / 8) ** 0.5:.3f})" in table
    assert f"gap recovered 67% ± {share_error:.0%}" in table
