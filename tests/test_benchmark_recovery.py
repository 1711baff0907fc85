"""The recovery benchmark's bookkeeping: resuming from an earlier results file, and the aggregated rows."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from benchmark_scripts import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("recovery")


def settings(**overrides):
    base = dict(model="smollm2-135m", method="wanda", sparsity=0.5, heads=0.25, steps=200, batch_size=8, limit=300,
                perplexity_passages=64, prune_samples=64, calibration_samples=128, pairs=256, data="text",
                distill_alpha=1.0, vector_lr=1e-2, matrix_lr=5e-4, device="cuda")  # fmt: skip
    return base | overrides


def reference(name, avg_acc, ppl):
    return {"method": name, "trainable_params": 0, "tasks": {"rte": avg_acc}, "avg_acc": avg_acc, "ppl": ppl}


def read(*paths):
    """Results files as the benchmark reads them once, to pass to ``finished_runs``."""
    return [json.loads(path.read_text()) for path in paths]


def run(seed, avg_acc, ppl, **extra):
    return {"seed": seed, "trainable_params": 10, "tasks": {"rte": avg_acc}, "avg_acc": avg_acc, "ppl": ppl,
            "sparsity_after_merge": 0.5, "train_seconds": 1.0, "train_memory_mb": 1.0} | extra  # fmt: skip


def test_resume_keeps_runs_of_the_same_settings_with_their_device(bench, tmp_path):
    earlier = {"settings": settings(), "rows": [reference("dense", 0.5, 50.0), {"method": "lora", "runs": [run(0, 0.4, 60.0)]}]}
    path = tmp_path / "recovery.json"
    path.write_text(json.dumps(earlier))
    # Another device or batch size for lm-eval does not change what is measured: the runs are kept.
    kept = bench.finished_runs(read(path), settings(device="cpu"))
    assert kept["lora"][0]["device"] == "cuda" and kept["__reference__"][0]["device"] == "cuda"
    # Other training data is another experiment: nothing is kept.
    assert bench.finished_runs(read(path), settings(data="instruction")) == {}


def test_resume_drops_runs_trained_with_another_recipe(bench, tmp_path):
    lora = run(0, 0.4, 60.0, data="text", distill_alpha=1.0, learning_rate=5e-4)
    # restorelcc-instruction trains with the paper's lr 1e-3 whatever --vector-lr says; a run at 1e-2 is stale.
    stale = run(0, 0.41, 180.0, data="instruction", distill_alpha=None, learning_rate=1e-2)
    current = run(1, 0.42, 100.0, data="instruction", distill_alpha=None, learning_rate=1e-3)
    free = run(0, 0.40, 99.0, data=None, distill_alpha=1.0, learning_rate=None)  # untrained: nothing to compare
    earlier = {"settings": settings(), "rows": [reference("dense", 0.5, 50.0),
               {"method": "lora", "runs": [lora]}, {"method": "restorelcc-instruction", "runs": [stale, current]},
               {"method": "restorelcc-free", "runs": [free]}]}  # fmt: skip
    path = tmp_path / "recovery.json"
    path.write_text(json.dumps(earlier))
    kept = bench.finished_runs(read(path), settings())
    assert [r["seed"] for r in kept["restorelcc-instruction"]] == [1]
    assert kept["lora"][0]["learning_rate"] == 5e-4 and kept["restorelcc-free"][0]["ppl"] == 99.0
    # A lower --matrix-lr makes the LoRA run stale too (and the file's settings differ: nothing is kept).
    assert "lora" not in bench.finished_runs(read(path), settings(matrix_lr=1e-4))


def test_resume_drops_runs_of_a_row_the_benchmark_no_longer_defines(bench, tmp_path):
    lora = run(0, 0.4, 60.0, data="text", distill_alpha=1.0, learning_rate=5e-4)
    retired = run(0, 0.38, 67.1, data="text", distill_alpha=1.0, learning_rate=1e-2)
    earlier = {"settings": settings(), "rows": [reference("dense", 0.5, 50.0), {"method": "lora", "runs": [lora]},
               {"method": "restorelcc-probe-per-layer", "runs": [retired]}]}  # fmt: skip
    path = tmp_path / "recovery.json"
    path.write_text(json.dumps(earlier))
    kept = bench.finished_runs(read(path), settings())
    assert set(kept) == {"__reference__", "lora"}


def test_resume_merges_shards_without_repeating_a_run(bench, tmp_path):
    mine, shard = tmp_path / "recovery.json", tmp_path / "shard.json"
    lora = dict(data="text", distill_alpha=1.0, learning_rate=5e-4)
    mine.write_text(json.dumps({"settings": settings(), "rows": [reference("dense", 0.5, 50.0),
                    {"method": "lora", "runs": [run(0, 0.4, 60.0, **lora)]}]}))  # fmt: skip
    shard.write_text(json.dumps({"settings": settings(device="cpu"), "rows": [reference("dense", 0.6, 40.0),
                     {"method": "lora", "runs": [run(0, 0.9, 10.0, **lora), run(1, 0.45, 55.0, **lora)]}]}))  # fmt: skip
    kept = bench.finished_runs(read(mine, shard), settings())
    # The first file wins a run both hold, and the reference rows; the shard adds what only it has.
    assert [(r["seed"], r["avg_acc"]) for r in kept["lora"]] == [(0, 0.4), (1, 0.45)]
    assert kept["__reference__"][0]["avg_acc"] == 0.5
    assert kept["lora"][1]["device"] == "cpu"  # the shard's settings say where its runs ran
    # A shard of other settings is another experiment: ignored.
    shard.write_text(json.dumps({"settings": settings(limit=20), "rows": [{"method": "ia3", "runs": [run(0, 0.4, 60.0)]}]}))
    assert "ia3" not in bench.finished_runs(read(mine, shard), settings())


def test_aggregate_gives_mean_spread_and_gap_shares(bench):
    dense, pruned = reference("dense", 0.5, 50.0) | {"sparsity": 0.0}, reference("pruned", 0.3, 100.0) | {"sparsity": 0.5}
    row = bench.aggregate("restorelcc", [run(0, 0.4, 60.0, device="cpu"), run(1, 0.5, 80.0, device="cuda")], dense, pruned)
    assert row["avg_acc"] == pytest.approx(0.45) and row["avg_acc_std"] == pytest.approx(0.0707, abs=1e-4)
    assert row["gap_recovered"] == pytest.approx(0.75)  # mean of 50% and 100%
    # log-perplexity gap: (log 100 - log 60) / log 2 and (log 100 - log 80) / log 2
    assert row["gap_recovered_ppl"] == pytest.approx((0.7370 + 0.3219) / 2, abs=1e-3)
    assert row["device"] == "cpu,cuda"
    table = bench.markdown_table({"rows": [dense | {"sparsity_after_merge": 0.0}, row]})
    assert "| restorelcc | 10 |" in table and table.rstrip().endswith("| cpu,cuda |")
    # Training time is given per device when the seeds ran on different ones.
    assert "| 1 cpu / 1 cuda |" in table


def test_aggregate_gives_the_item_noise_of_the_gap_share_where_every_row_kept_its_items(bench):
    from peft_restorelcc.recovery import gap_recovered_stderr, item_scores

    dense = reference("dense", 0.75, 50.0) | {"sparsity": 0.0, "items": {"rte": "11011101"}}
    pruned = reference("pruned", 0.375, 100.0) | {"sparsity": 0.5, "items": {"rte": "10010100"}}
    first, second = run(0, 0.625, 60.0, items={"rte": "11010101"}), run(1, 0.5, 60.0, items={"rte": "10011100"})
    row = bench.aggregate("restorelcc", [first, second], dense, pruned)
    expected = [
        gap_recovered_stderr(*({"rte": item_scores(r["items"]["rte"])} for r in (dense, pruned, one)))
        for one in (first, second)
    ]
    assert all(value > 0 for value in expected)
    assert row["gap_recovered_item_stderr"] == pytest.approx(sum(expected) / 2)
    assert f"| ±{row['gap_recovered_item_stderr']:.0%} |" in bench.markdown_table({"rows": [row]})
    # A run measured before runs kept their items adds nothing; with none at all there is no figure.
    older = run(2, 0.5, 60.0)
    assert bench.aggregate("restorelcc", [first, older], dense, pruned)["gap_recovered_item_stderr"] == pytest.approx(
        expected[0]
    )
    assert bench.aggregate("restorelcc", [older], dense, pruned)["gap_recovered_item_stderr"] is None


def test_paired_differences_compare_rows_over_their_shared_seeds_on_the_tasks_given(bench):
    from peft_restorelcc.recovery import item_scores, paired_stderr

    def items(rte, boolq="1111"):
        return {"rte": rte, "boolq": boolq}

    pruned = reference("pruned", 0.25, 100.0) | {"items": items("1000")}
    restorelcc = {"method": "restorelcc", "runs": [run(1, 0.5, 60.0, items=items("1100")),
                                                   run(0, 0.75, 60.0, items=items("1110", "0000"))]}  # fmt: skip
    lora = {"method": "lora", "runs": [run(0, 1.0, 60.0, items=items("1111")), run(2, 0.0, 60.0, items=items("0000")),
                                       run(1, 0.5, 60.0, items=items("1010"))]}  # fmt: skip
    unpaired = {"method": "ia3", "runs": [run(3, 0.5, 60.0, items=items("1100"))]}
    older = {"method": "dora", "runs": [run(0, 0.5, 60.0)]}  # measured before runs kept their items
    partly = {"method": "ln-tuning", "runs": [run(0, 0.5, 60.0), run(1, 0.25, 60.0, items=items("0100"))]}
    rows = [pruned, restorelcc, lora, unpaired, older, partly]
    differences = bench.paired_differences(rows, "restorelcc", ["rte"])
    assert set(differences) == {"pruned", "lora", "ln-tuning"}  # ia3 shares no seed, dora kept no items
    # LoRA against RestoreLCC over seeds 0 and 1, the ones both ran (not LoRA's seed 2), each item's score averaged
    # over them: RTE 1, .5, 1, .5 against 1, 1, .5, 0. Only RTE counts (BoolQ differs but is not given).
    assert differences["lora"]["seeds"] == [0, 1]
    assert differences["lora"]["difference"] == pytest.approx(0.75 - 0.625)
    # Per-item differences 0, -.5, .5, .5: sum of squared deviations from their mean .125 is .6875.
    assert differences["lora"]["stderr"] == pytest.approx((0.6875 / 3 / 4) ** 0.5)
    # The pruned row is one measurement: it pairs with every seed of RestoreLCC (1 - 1, 0 - 1, 0 - .5, 0 - 0).
    assert differences["pruned"] == {"seeds": [0, 1], "difference": pytest.approx(0.25 - 0.625),
                                     "stderr": pytest.approx((0.6875 / 3 / 4) ** 0.5)}  # fmt: skip
    # A row whose lowest seed predates kept items still pairs on the seeds that kept them, as one seed's scores.
    one_seed = paired_stderr({"rte": item_scores("0100")}, {"rte": item_scores("1100")})
    assert differences["ln-tuning"] == {"seeds": [1], "difference": pytest.approx(0.25 - 0.5),
                                        "stderr": pytest.approx(one_seed)}  # fmt: skip
    report = {"rows": [], "paired_with": {"method": "restorelcc", "differences": differences}}
    line = bench.markdown_table(report | {"rows": [restorelcc | {
        "trainable_params": 1, "tasks": {"rte": 0.625}, "avg_acc": 0.625, "ppl": 60.0, "sparsity_after_merge": 0.5}]})
    assert f"lora (seeds 0,1) +0.1250 ± {differences['lora']['stderr']:.4f}" in line
    assert f"ln-tuning (seed 1) -0.2500 ± {one_seed:.4f}" in line
    assert bench.paired_differences(rows, "lora-oproj", ["rte"]) == {} == bench.paired_differences(rows, "lora", [])


def test_the_gap_share_over_tasks_above_chance_leaves_out_a_task_the_dense_model_is_at_chance_on(bench):
    from peft_restorelcc.evaluation import chance_accuracy

    tasks = {"boolq": 0.52, "hellaswag": 0.46}
    dense = {"method": "dense", "trainable_params": 0, "tasks": tasks, "avg_acc": 0.49, "ppl": 50.0, "sparsity": 0.0,
             "sparsity_after_merge": 0.0, "items": {"boolq": "10" * 150, "hellaswag": "1" * 138 + "0" * 162}}  # fmt: skip
    pruned = dense | {"method": "pruned", "tasks": {"boolq": 0.62, "hellaswag": 0.36}, "avg_acc": 0.49, "ppl": 90.0,
                      "sparsity": 0.5, "sparsity_after_merge": 0.5, "items": {"boolq": "1" * 186 + "0" * 114, "hellaswag": "1" * 108 + "0" * 192}}
    above = bench.above_chance(dense, 300)
    assert above["tasks"] == ["hellaswag"] and above["chance"]["boolq"] == pytest.approx(chance_accuracy("boolq", 300))
    restored = run(0, 0.53, 60.0, tasks={"boolq": 0.62, "hellaswag": 0.44},
                   items={"boolq": "1" * 186 + "0" * 114, "hellaswag": "1" * 132 + "0" * 168})  # fmt: skip
    row = bench.aggregate("restorelcc", [restored], dense, pruned, above["tasks"])
    assert row["gap_recovered"] is None  # the pruned model's BoolQ lead cancels its HellaSwag loss
    assert row["gap_recovered_above_chance"] == pytest.approx(0.8)
    assert 0 < row["gap_recovered_above_chance_item_stderr"] < 1
    table = bench.markdown_table({"rows": [dense, pruned, row], "above_chance": above})
    assert f"| 80% (items ±{row['gap_recovered_above_chance_item_stderr']:.0%}) |" in table
    assert "more than 1.645 standard errors): hellaswag. Chance: boolq 0.6" in table
    # Rows without item scores still get the share, from their per-task accuracies, but no item noise.
    plain = bench.aggregate("restorelcc", [run(0, 0.53, 60.0, tasks=restored["tasks"])], dense, pruned, ["hellaswag"])
    assert plain["gap_recovered_above_chance"] == pytest.approx(0.8)
    assert plain["gap_recovered_above_chance_item_stderr"] is None


def test_resume_prefers_dense_and_pruned_rows_that_kept_their_items(bench, tmp_path):
    first, second = tmp_path / "first.json", tmp_path / "second.json"
    first.write_text(json.dumps({"settings": settings(), "rows": [reference("dense", 0.5, 50.0)]}))
    with_items = reference("dense", 0.5, 50.0) | {"items": {"rte": "10"}}
    second.write_text(json.dumps({"settings": settings(), "rows": [with_items]}))
    assert bench.finished_runs(read(first, second), settings())["__reference__"][0]["items"] == {"rte": "10"}
    # Between two files with items the first still wins.
    other = reference("dense", 0.5, 50.0) | {"items": {"rte": "01"}}
    first.write_text(json.dumps({"settings": settings(), "rows": [other]}))
    assert bench.finished_runs(read(first, second), settings())["__reference__"][0]["items"] == {"rte": "01"}


def test_runs_are_refused_on_other_weights_than_the_earlier_rows_measured(bench):
    model = torch.nn.Linear(3, 2)
    fingerprint = bench.weights_fingerprint(model)
    assert fingerprint == bench.weights_fingerprint(model) and len(fingerprint) == 16
    reference = {"pruned": {"weights_sha256": fingerprint}, "dense": {}}  # rows of older files record none
    bench.check_same_models(reference, {"dense": "anything", "pruned": fingerprint})
    with torch.no_grad():
        model.weight[0, 0] = 0.0  # one more weight pruned: another model
    with pytest.raises(SystemExit, match="is not the one the earlier results measured"):
        bench.check_same_models(reference, {"pruned": bench.weights_fingerprint(model)})


def test_runs_trained_on_other_pruned_weights_are_named(bench):
    reference = {"pruned": {"weights_sha256": "aaaa"}}
    # Older runs record no weights (ia3 here): nothing to compare.
    runs = {"lora": [run(0, 0.4, 60.0, pruned_weights_sha256="aaaa"), run(1, 0.4, 60.0, pruned_weights_sha256="bbbb")],
            "ia3": [run(0, 0.4, 60.0)]}  # fmt: skip
    assert bench.runs_on_other_weights(reference, runs) == ["lora seed 1"]
    assert bench.runs_on_other_weights({"pruned": {}}, runs) == []


def test_settings_with_shards_are_written_as_json(bench):
    recorded = bench.json_settings({"output": Path("/results"), "resume_from": [Path("/a/recovery.json")], "steps": 3})
    assert json.loads(json.dumps(recorded)) == {"output": "/results", "resume_from": ["/a/recovery.json"], "steps": 3}


def test_shards_run_apart_then_merge_into_one_results_file(bench, tmp_path, monkeypatch, capsys):
    """The whole benchmark on a tiny model: one shard per method, then a merge that reruns nothing."""
    from test_training import char_tokenizer
    from tiny_models import make_tiny_model

    model_dir = tmp_path / "tiny-llama"
    make_tiny_model("llama", max_position_embeddings=512, initializer_range=0.3).save_pretrained(model_dir)
    char_tokenizer().save_pretrained(model_dir)
    common = ["--model", str(model_dir), "--steps", "1", "--batch-size", "2", "--limit", "2", "--perplexity-passages",
              "2", "--prune-samples", "4", "--calibration-samples", "6", "--pairs", "8", "--seeds", "0",
              "--claim-seeds", "0", "--device", "cpu"]  # fmt: skip
    mine, shard = tmp_path / "mine", tmp_path / "shard"

    def benchmark(*flags):
        monkeypatch.setattr("sys.argv", ["recovery.py", *common, *flags])
        bench.main()
        return json.loads((Path(flags[flags.index("--output") + 1]) / "recovery.json").read_text())

    first = benchmark("--methods", "restorelcc-free", "--output", str(mine))
    other = benchmark("--methods", "head-bias", "--output", str(shard), "--resume-from", str(mine / "recovery.json"))
    assert other["rows"][:2] == first["rows"][:2]  # the shard reuses the dense and pruned rows, not re-measured
    merged = benchmark(
        "--methods", "restorelcc-free,head-bias", "--output", str(mine), "--resume-from", str(shard / "recovery.json")
    )
    by_method = {row["method"]: row for row in merged["rows"]}
    assert set(by_method) == {"dense", "pruned", "restorelcc-free", "head-bias"} and merged["finished"]
    assert by_method["head-bias"]["runs"] == {r["method"]: r for r in other["rows"]}["head-bias"]["runs"]
    assert by_method["head-bias"]["sparsity_after_merge"] == pytest.approx(0.5, abs=0.01)
    # Every run records the pruned weights it trained on, and they are those of the pruned row.
    assert {run["pruned_weights_sha256"] for run in by_method["head-bias"]["runs"]} == {
        by_method["pruned"]["weights_sha256"]
    }
    assert by_method["dense"]["weights_sha256"] != by_method["pruned"]["weights_sha256"]
    # Every model's per-item scores are kept (two items per task), for paired standard errors.
    for kept in (by_method["dense"], by_method["pruned"], *by_method["head-bias"]["runs"]):
        assert {task: len(scores) for task, scores in kept["items"].items()} == {task: 2 for task in kept["tasks"]}
    assert merged["settings"]["resume_from"] == [str(shard / "recovery.json")]
    assert (mine / "recovery.png").stat().st_size > 0 and "| head-bias |" in (mine / "recovery.md").read_text()

    # --merge-only is bookkeeping: it loads no model (this one is gone) and gives the rows a full merge gives.
    shutil.rmtree(model_dir)
    files = [str(mine / "recovery.json"), str(shard / "recovery.json")]
    only = benchmark("--merge-only", "--output", str(tmp_path / "only"), "--resume-from", *files)
    assert only["rows"] == merged["rows"] and only["heads_total"] == merged["heads_total"]
    paired = benchmark("--merge-only", "--output", str(tmp_path / "paired"), "--paired-with", "pruned",
                       "--resume-from", *files)["paired_with"]  # fmt: skip
    # Every other row against the pruned one, over the tasks above chance: the dense row's difference is its lead.
    rows, above = {row["method"]: row for row in only["rows"]}, only["above_chance"]["tasks"]
    assert paired["method"] == "pruned" and set(paired["differences"]) == {"dense", "restorelcc-free", "head-bias"}
    assert paired["differences"]["dense"]["difference"] == pytest.approx(
        sum(rows["dense"]["tasks"][task] - rows["pruned"]["tasks"][task] for task in above) / len(above)
    )
    assert paired["differences"]["head-bias"]["seeds"] == [0]
    assert "accuracy minus pruned's (± the paired standard error): dense " in (tmp_path / "paired" / "recovery.md").read_text()
    assert only["pruning"] == merged["pruning"] and (tmp_path / "only" / "recovery.png").stat().st_size > 0
    # Its settings say what it holds, not the defaults of the --methods/--seeds it ignores.
    assert only["settings"]["methods"] == "restorelcc-free,head-bias" and only["settings"]["claim_seeds"] is None
    # A merge in place (to add what a newer benchmark computes) keeps the rows and still names the shards merged.
    again = benchmark("--merge-only", "--output", str(mine))
    assert again["rows"] == merged["rows"] and again["settings"]["resume_from"] == [str(shard / "recovery.json")]
    # Results of other settings hold no rows to merge: a clear error, and nothing written.
    with pytest.raises(SystemExit):
        benchmark("--merge-only", "--limit", "3", "--output", str(tmp_path / "none"), "--resume-from", *files)
    assert "no dense and pruned rows measured with these settings" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()
    # A run trained on other pruned weights than the pruned row measured is not merged beside it.
    tampered = json.loads((shard / "recovery.json").read_text())
    next(row for row in tampered["rows"] if row["method"] == "head-bias")["runs"][0]["pruned_weights_sha256"] = "0" * 16
    (tmp_path / "tampered.json").write_text(json.dumps(tampered))
    with pytest.raises(SystemExit):
        benchmark("--merge-only", "--output", str(tmp_path / "mixed"), "--resume-from", str(tmp_path / "tampered.json"))
    assert "head-bias seed 0 trained on other pruned weights" in capsys.readouterr().err
    assert not (tmp_path / "mixed").exists()


def test_a_semi_structured_benchmark_prunes_to_its_pattern_and_is_kept_apart(bench, tmp_path, monkeypatch):
    """--pattern 2:4 on a tiny model: the pruned model holds the pattern, the file records it, and its runs are never
    resumed into (or from) an unstructured benchmark at the same sparsity. Sparse fine-tuning trains every weight
    and keeps the pattern too."""
    from test_training import char_tokenizer
    from tiny_models import make_tiny_model

    from peft_restorelcc.assets import load_model
    from peft_restorelcc.pruning import check_nm_pattern

    model_dir = tmp_path / "tiny-llama"
    make_tiny_model("llama", max_position_embeddings=512, initializer_range=0.3).save_pretrained(model_dir)
    char_tokenizer().save_pretrained(model_dir)
    monkeypatch.setattr("sys.argv", ["recovery.py", "--model", str(model_dir), "--pattern", "2:4", "--limit", "2",
                                     "--perplexity-passages", "2", "--prune-samples", "4", "--calibration-samples",
                                     "6", "--pairs", "8", "--methods", "restorelcc-free,sparse-ft-instruction",
                                     "--claim-seeds", "0", "--steps", "2", "--batch-size", "2", "--device", "cpu",
                                     "--output", str(tmp_path / "out")])  # fmt: skip
    bench.main()
    report = json.loads((tmp_path / "out" / "recovery.json").read_text())
    assert report["settings"]["pattern"] == "2:4" and report["settings"]["sparsity"] == 0.5
    assert report["pruning"]["pattern"] == "2:4"
    (cache,) = (tmp_path / "out" / "recovery-work" / "cache").iterdir()
    assert cache.name.endswith("-0.5-2of4-p4-c6-8")
    pruned = load_model(cache / "pruned")
    projections = [module.weight for name, module in pruned.named_modules() if name.endswith(("o_proj", "down_proj"))]
    assert projections and all(check_nm_pattern(weight, 2, 4) for weight in projections)
    rows = {row["method"]: row for row in report["rows"]}
    assert rows["restorelcc-free"]["sparsity_after_merge"] == pytest.approx(0.5, abs=0.01)
    # Sparse fine-tuning trained every weight of the pruned model (the tied embedding once), on the paper's recipe
    # at its own rate, and the model it saved still holds 2:4 in every projection.
    (sparse_run,) = rows["sparse-ft-instruction"]["runs"]
    assert sparse_run["trainable_params"] == sum(parameter.numel() for parameter in pruned.parameters())
    assert (sparse_run["data"], sparse_run["learning_rate"]) == ("instruction", 5e-5)
    trained = load_model(tmp_path / "out" / "recovery-work" / "sparse-ft-instruction-seed0")
    trained_projections = {name: module.weight for name, module in trained.named_modules() if name.endswith("proj")}
    assert all(check_nm_pattern(weight, 2, 4) for weight in trained_projections.values())
    assert sparse_run["sparsity_after_merge"] == rows["pruned"]["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert any(not torch.equal(trained.state_dict()[name], tensor) for name, tensor in pruned.state_dict().items())
    assert not bench.measured_alike(report["settings"], report["settings"] | {"pattern": None})
    # A file written before --pattern existed records no pattern: it measured what an unstructured run measures.
    assert bench.measured_alike(settings(), settings(pattern=None))


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--pattern", "1:4", "--sparsity", "0.5"], "implies sparsity=0.75"),
        (["--pattern", "2x4"], "Malformed N:M pattern '2x4'"),
        (["--sparsity", "1.5"], "outside [0, 1)"),
        (["--paired-with", "restorelcc-instructions"], "--paired-with: unknown row 'restorelcc-instructions'"),
        # In-task pairs are the evaluation tasks' items after the first 300: a longer evaluation would score them.
        (["--methods", "lora,sparse-ft-instruction-in-task", "--limit", "301"], "--limit 301 would score some of them"),
        (["--methods", "lora", "--data", "instruction-in-task", "--limit", "400"], "lora train on the evaluation"),
        (["--methods", "restorelcc-cloze-in-task", "--limit", "500"], "restorelcc-cloze-in-task train on the eval"),
        (["--methods", "ia3", "--data", "cloze-in-task", "--limit", "301"], "ia3 train on the evaluation"),
        (["--methods", "restorelcc-instruction-and-cloze-in-task", "--limit", "301"], "--limit 301 would score"),
        (["--methods", "sparse-ft-instruction-and-cloze-in-task", "--limit", "301"], "--limit 301 would score"),
    ],
)
def test_bad_sparsity_flags_are_named_before_any_model_loads(bench, tmp_path, monkeypatch, capsys, flags, message):
    monkeypatch.setattr("sys.argv", ["recovery.py", "--model", str(tmp_path / "no-model"), *flags,
                                     "--output", str(tmp_path / "out")])  # fmt: skip
    with pytest.raises(SystemExit):
        bench.main()
    assert message in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_time_of_a_shard_counts_once(bench):
    main_file = {"total_seconds": 100.0}
    # A shard that resumed from the main file records the main file's time as a shard of its own.
    shard = {"total_seconds": 130.0, "shard_seconds": {"/main/recovery.json": 100.0}}
    assert bench.own_seconds(main_file) == 100.0 and bench.own_seconds(shard) == 30.0
    assert bench.own_seconds({"own_seconds": 7.0, "total_seconds": 50.0}) == 7.0


def test_a_merge_counts_each_shard_once_and_its_own_shards_too(bench, tmp_path):
    main, shard, fresh = tmp_path / "main.json", tmp_path / "shard.json", tmp_path / "fresh.json"
    main_report = {"own_seconds": 100.0, "shard_seconds": {"/b.json": 40.0}, "total_seconds": 140.0}
    # The shard resumed from main: its record of main's time must not count twice when merged back into main.
    shard_report = {"own_seconds": 30.0, "shard_seconds": {str(main.resolve()): 100.0}, "total_seconds": 130.0}
    into_main = bench.shard_times(main, main_report, {shard: shard_report})
    assert into_main == {"/b.json": 40.0, str(shard.resolve()): 30.0}
    # Merged elsewhere, main is a shard like any other, and the shard it merged before still counts.
    into_fresh = bench.shard_times(fresh, {}, {main: main_report, shard: shard_report})
    assert sum(into_fresh.values()) == 100.0 + 40.0 + 30.0


def test_labels_of_points_at_the_same_parameter_count_are_spread_apart(bench):
    # Three rows at RestoreLCC's 8,704 parameters, two of them nearly level; one far away at LoRA's count.
    points = [(8704, 0.41), (8704, 0.40), (8640, 0.43), (2_442_240, 0.405)]
    heights = bench.spread_labels(points, min_gap=0.05)
    assert heights[1] == 0.40  # the lowest keeps its place
    assert heights[0] == pytest.approx(0.45)  # pushed above the lowest
    assert heights[2] == pytest.approx(0.50)  # and then above the one it was pushed to
    assert heights[3] == 0.405  # another x: untouched


def test_a_wider_x_factor_spreads_labels_of_nearby_parameter_counts(bench):
    # RestoreLCC at 25% and 50% of the heads: 8,704 and 17,280 parameters, labels level.
    points = [(8704, 0.41), (17_280, 0.41)]
    assert bench.spread_labels(points, min_gap=0.05) == [0.41, 0.41]  # twice apart: outside the default 1.5
    assert bench.spread_labels(points, min_gap=0.05, x_factor=3.0)[1] == pytest.approx(0.46)


def test_a_long_label_spreads_the_label_of_a_point_it_runs_over(bench):
    # restorelcc-instruction-heads-50% at 17,280 parameters runs right over ia3-instruction at 57,600, nearly level.
    points = [(17_280, -0.41), (57_600, -0.40)]
    assert bench.spread_labels(points, min_gap=0.05, x_factor=3.0)[1] == -0.40  # 3.3x apart: not near by x alone
    heights = bench.spread_labels(points, min_gap=0.05, x_factor=3.0, reaches=[7.0, 1.5])
    assert heights == [-0.41, pytest.approx(-0.36)]
    # The reach of the right-hand label does not matter: it runs away from the other point.
    assert bench.spread_labels(points, min_gap=0.05, x_factor=3.0, reaches=[1.5, 7.0])[1] == -0.40


def test_random_draws_pick_heads_by_their_own_seed_whatever_the_training_seed(bench):
    from argparse import Namespace

    from tiny_models import make_tiny_model, random_input_ids

    from peft_restorelcc.calibration import calibrate, score_heads, select_heads

    dense, pruned = make_tiny_model("llama"), make_tiny_model("llama")
    with torch.no_grad():
        pruned.model.layers[0].self_attn.o_proj.weight[:, :8] = 0
    prompts = random_input_ids(batch=8, length=8, seed=4).tolist()
    components = calibrate(dense, pruned, prompts, strategy="lost_norm", kept_heads=None, progress=False)
    context = bench.Context(pruned, components, None, Namespace(heads=0.5, device="cpu"))

    def wrapped_heads(name, training_seed):
        torch.manual_seed(training_seed)
        return bench.METHODS[name][0](context).peft_config["default"].heads

    draws = {}
    for draw, name in enumerate(["restorelcc-random", "restorelcc-random-draw1", "restorelcc-random-draw2"]):
        draws[name] = wrapped_heads(name, 0)
        assert draws[name] == select_heads(score_heads(components, "random", seed=draw), 0.5)
        assert wrapped_heads(name, 1) == draws[name]  # the training seed does not redraw the heads
    assert len({str(heads) for heads in draws.values()}) == 3  # three draws, three sets of 4 of the 8 heads
    assert wrapped_heads("restorelcc-instruction-random", 1) == draws["restorelcc-random"]  # draw 0, other recipe
    # The per-layer rows wrap their spread selection, not the top one: two heads in each of the two layers.
    spread = wrapped_heads("restorelcc-instruction-per-layer", 0)
    assert spread == bench.chosen_heads(components, "restorelcc-instruction-per-layer", 0.5)
    assert sorted(map(len, spread.values())) == [2, 2] and select_heads(components, 0.5) != spread
    assert sum(map(len, draws["restorelcc-random-draw1"].values())) == 4


def test_per_layer_rows_spread_the_probes_heads_keeping_its_tie_break(bench):
    from tiny_models import grid_components

    from peft_restorelcc.calibration import select_heads

    # Probe accuracies tie in every layer; the validation loss (tie_break, lower first) prefers each layer's head 1.
    accuracy, validation_loss = torch.tensor([0.5, 0.5, 0.7, 0.7, 0.6, 0.6]), torch.tensor([2.0, 1, 2, 1, 2, 1])
    probe = grid_components(3, 2).with_scores(accuracy, "probe", tie_break=validation_loss)
    assert bench.chosen_heads(probe, "restorelcc", 2) == select_heads(probe, 2) == {1: [0, 1]}
    # Both recipes' per-layer rows select as restorelcc run --selection per-layer does, keeping the tie-break.
    for name in ("restorelcc-per-layer", "restorelcc-instruction-per-layer"):
        assert bench.chosen_heads(probe, name, 3) == select_heads(probe, 3, "per-layer") == {0: [1], 1: [1], 2: [1]}
        assert bench.chosen_heads(probe, name, 4) == {0: [1], 1: [0, 1], 2: [1]}
    # Trained on the paper's recipe whatever the benchmark's --data, --distill-alpha and --vector-lr.
    settings = {"vector_lr": 1e-2, "data": "text", "distill_alpha": 1}
    shares = ("restorelcc-instruction-heads-50%", "restorelcc-instruction-heads-70%")
    for name in ("restorelcc-instruction-per-layer", "restorelcc-instruction-random", *shares):
        assert bench.recipe_of(name, settings) == {"data": "instruction", "distill_alpha": 0.0, "learning_rate": 1e-3}


def test_every_row_runs_by_default_once_and_every_recipe_belongs_to_a_row(bench):
    default_rows = bench.MAIN_METHODS + bench.CLAIM_METHODS
    assert sorted(default_rows) == sorted(bench.METHODS)
    assert set(bench.RECIPE_OVERRIDES) <= set(bench.METHODS)
    # The learning-rate rows differ from their row only in the rate.
    settings = {"vector_lr": 1e-2, "matrix_lr": 5e-4, "data": "text", "distill_alpha": 1}
    paper = bench.recipe_of("restorelcc-instruction", settings)
    for name, rate in (("restorelcc-instruction-lr3e-4", 3e-4), ("restorelcc-instruction-lr1e-2", 1e-2)):
        assert bench.recipe_of(name, settings) == paper | {"learning_rate": rate}
        assert bench.METHODS[name][0] is bench.METHODS["restorelcc-instruction"][0]


def prompt_of(row: dict, tokenizer) -> str:
    """The prompt a training sequence holds: its tokens that carry no loss, decoded."""
    from peft_restorelcc.training import IGNORE_INDEX

    return tokenizer.decode([token for token, label in zip(row["input_ids"], row["labels"]) if label == IGNORE_INDEX])


@pytest.mark.parametrize(("data", "form"), [("instruction-in-task", "options"), ("cloze-in-task", "cloze")])
def test_in_task_rows_train_on_the_items_after_the_evaluated_ones_and_cut_none(bench, data, form):
    from peft_restorelcc.assets import load_tokenizer
    from peft_restorelcc.data import in_task_examples

    settings = {"vector_lr": 1e-2, "matrix_lr": 5e-4, "data": "text", "distill_alpha": 1}
    rows = {"options": "instruction-in-task", "cloze": "cloze-in-task"}[form]
    for method in ("restorelcc", "sparse-ft"):  # only the data differs from the recipe's row
        assert bench.recipe_of(f"{method}-{rows}", settings) == (
            bench.recipe_of(f"{method}-instruction", settings) | {"data": data}
        )
        assert bench.METHODS[f"{method}-{rows}"] == bench.METHODS[f"{method}-instruction"]
    tokenizer = load_tokenizer("smollm2-135m")
    dataset = bench.training_dataset(data, tokenizer, samples=6000, seed=2)
    examples = in_task_examples("train", seed=2, form=form)
    assert len(dataset) == len(examples)  # fewer pairs than samples: all of them, as the other data choices do
    for row, example in zip(dataset, examples):
        assert prompt_of(row, tokenizer) == example["prompt"]  # HellaSwag's long prompts too: nothing cut
    assert len(bench.training_dataset(data, tokenizer, samples=16, seed=2)) == 16


def test_mixed_recipe_rows_train_on_the_papers_data_with_half_the_loss_from_the_teacher(bench):
    settings = {"vector_lr": 1e-2, "matrix_lr": 5e-4, "data": "text", "distill_alpha": 1}
    recipe = bench.recipe_of("restorelcc-instruction-distill", settings)
    assert recipe == {"data": "instruction", "distill_alpha": 0.5, "learning_rate": 1e-3}
    # LoRA at its own rate, as on the paper's recipe alone.
    lora = bench.recipe_of("lora-instruction-distill", settings)
    assert lora == {"data": "instruction", "distill_alpha": 0.5, "learning_rate": 5e-4}
    assert bench.recipe_of("lora-instruction", settings)["learning_rate"] == lora["learning_rate"]
    # A run records the KL weight it trained with; one of the paper's recipe alone (no teacher) is another row's.
    mixed = run(0, 0.4, 93.0, data="instruction", distill_alpha=0.5, learning_rate=1e-3)
    assert bench.trained_as_now("restorelcc-instruction-distill", mixed, settings)
    paper = mixed | {"distill_alpha": None}
    assert not bench.trained_as_now("restorelcc-instruction-distill", paper, settings)


def assert_recipes_pairs_shuffled_with(
    bench,
    data: str,
    recipe_pairs: list[dict],
    other_pairs: list[dict],
    samples: int = 6000,
    recipe_share: tuple[float, float] = (0.3, 0.7),
) -> None:
    """A mixed row's sequences (seed 1): every pair of both sets once and none cut, shuffled together rather than one
    set after the other (the first 500 hold ``recipe_pairs`` at a share inside ``recipe_share``), and a shorter run
    reads the longer one's first sequences."""
    from peft_restorelcc.assets import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m")
    dataset = bench.training_dataset(data, tokenizer, samples=samples, seed=1)
    prompts = [prompt_of(row, tokenizer) for row in dataset]
    assert sorted(prompts) == sorted(e["prompt"] for e in recipe_pairs + other_pairs)
    recipe = {e["prompt"] for e in recipe_pairs}
    low, high = recipe_share
    assert low < sum(prompt in recipe for prompt in prompts[:500]) / 500 < high
    first = bench.training_dataset(data, tokenizer, samples=40, seed=1)
    assert [prompt_of(row, tokenizer) for row in first] == prompts[:40]


def test_the_mixed_row_trains_on_the_recipes_pairs_and_the_cloze_in_task_pairs_once_each(bench):
    from peft_restorelcc.data import in_task_examples, instruction_examples

    settings = {"vector_lr": 1e-2, "matrix_lr": 5e-4, "data": "text", "distill_alpha": 1}
    for method in ("restorelcc", "sparse-ft"):  # only the data differs from the recipe's row
        name = f"{method}-instruction-and-cloze-in-task"
        assert bench.recipe_of(name, settings) == (
            bench.recipe_of(f"{method}-instruction", settings) | {"data": bench.MIXED_IN_TASK_DATA}
        )
        assert bench.METHODS[name] == bench.METHODS[f"{method}-instruction"]
    assert_recipes_pairs_shuffled_with(
        bench, bench.MIXED_IN_TASK_DATA, instruction_examples("train"), in_task_examples("train", form="cloze")
    )


def test_the_piqa_sciq_row_swaps_the_mixes_in_task_pairs_for_cloze_pairs_of_piqa_and_sciq(bench):
    from peft_restorelcc.data import cloze_examples, instruction_examples

    settings = {"vector_lr": 1e-2, "matrix_lr": 5e-4, "data": "text", "distill_alpha": 1}
    name = "restorelcc-instruction-and-cloze-piqa-sciq"
    assert bench.recipe_of(name, settings) == (
        bench.recipe_of("restorelcc-instruction-and-cloze-in-task", settings) | {"data": bench.MIXED_EXTRA_DATA}
    )
    assert bench.METHODS[name] == bench.METHODS["restorelcc-instruction"]
    # Sets no task evaluates: --limit is not capped for it.
    assert bench.MIXED_EXTRA_DATA not in bench.IN_TASK_DATA_CHOICES
    assert_recipes_pairs_shuffled_with(
        bench, bench.MIXED_EXTRA_DATA, instruction_examples("train"), cloze_examples("train")
    )


def test_the_cloze_wide_row_trains_on_every_pair_of_the_five_sets_in_the_cloze_form_alone(bench):
    from peft_restorelcc.assets import load_tokenizer
    from peft_restorelcc.data import WIDE_TRAINING_SOURCES, cloze_examples

    settings = {"vector_lr": 1e-2, "matrix_lr": 5e-4, "data": "text", "distill_alpha": 1}
    assert bench.recipe_of("restorelcc-cloze-wide", settings) == (
        bench.recipe_of("restorelcc-instruction", settings) | {"data": bench.CLOZE_WIDE_DATA}
    )
    tokenizer = load_tokenizer("smollm2-135m")
    dataset = bench.training_dataset(bench.CLOZE_WIDE_DATA, tokenizer, samples=6000, seed=1)
    prompts = [prompt_of(row, tokenizer) for row in dataset]
    pairs = cloze_examples("train", seed=1, sources=WIDE_TRAINING_SOURCES)
    assert prompts == [e["prompt"] for e in pairs]  # each once, in the seed's order, none cut
    assert len(prompts) == 5513 and not any("\nA. " in prompt for prompt in prompts)  # no options shown


@pytest.mark.parametrize("mix", ["in-task", "piqa-sciq"])
def test_the_science_rows_add_mmlus_science_pairs_to_their_mix_and_nothing_else(bench, mix):
    from peft_restorelcc.assets import load_tokenizer
    from peft_restorelcc.data import SCIENCE_SOURCES, cloze_examples

    settings = {"vector_lr": 1e-2, "matrix_lr": 5e-4, "data": "text", "distill_alpha": 1}
    name = f"restorelcc-instruction-and-cloze-{mix}"
    mix_data = bench.recipe_of(name, settings)["data"]
    science_data = bench.recipe_of(f"{name}-mmlu-science", settings)["data"]
    assert bench.recipe_of(f"{name}-mmlu-science", settings) == bench.recipe_of(name, settings) | {"data": science_data}
    assert bench.METHODS[f"{name}-mmlu-science"] == bench.METHODS[name]
    # The in-task one reads evaluation items after the first 300, so --limit stays capped for it; the other does not.
    assert (science_data in bench.IN_TASK_DATA_CHOICES) == (mix == "in-task")
    tokenizer = load_tokenizer("smollm2-135m")
    mix_pairs = [{"prompt": prompt_of(row, tokenizer)} for row in bench.training_dataset(mix_data, tokenizer, 8000, 1)]
    # Every pair of the mix and of the science set once, none cut, the science pairs (a fifth) spread through the run.
    science_pairs = cloze_examples("train", seed=1, sources=SCIENCE_SOURCES)
    assert_recipes_pairs_shuffled_with(
        bench, science_data, science_pairs, mix_pairs, samples=8000, recipe_share=(0.1, 0.35)
    )


@pytest.mark.parametrize("mix", ["in-task", "piqa-sciq"])
def test_the_mixes_on_half_the_heads_differ_from_their_mix_only_in_the_share(bench, mix):
    settings = {"vector_lr": 1e-2, "matrix_lr": 5e-4, "data": "text", "distill_alpha": 1}
    name = f"restorelcc-instruction-and-cloze-{mix}"
    assert bench.recipe_of(f"{name}-heads-50%", settings) == bench.recipe_of(name, settings)
    # The builder of the paper's recipe on 50% of the heads; the mix itself is built on the benchmark's --heads.
    assert bench.METHODS[f"{name}-heads-50%"] == bench.METHODS["restorelcc-instruction-heads-50%"]
    assert bench.METHODS[name] == bench.METHODS["restorelcc-instruction"]
