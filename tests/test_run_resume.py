"""``restorelcc run --resume``: a run killed (SIGKILL, a real subprocess) at a stage and resumed writes the
results.json of an uninterrupted run, but for timings; it reuses the finished stages and says so; changed settings
redo what depends on them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import test_cli_run

from peft_restorelcc.cli import main
from peft_restorelcc.io.stages import STAGES_FILE

REPO = Path(__file__).resolve().parents[1]
# A run that stops (and waits to be killed) when it reaches a stage: the stage's function is replaced in the child.
STOPPING_RUN = textwrap.dedent(
    """
    import sys, time
    import peft_restorelcc.pipeline.job as pipeline  # where run_job looks its stages up
    from peft_restorelcc.cli import main

    stage, argv = sys.argv[1], sys.argv[2:]

    def stop(*args, **kwargs):
        print("STOPPED", flush=True)
        time.sleep(600)

    if stage == "calibrate":
        pipeline.calibrate_components = stop
    else:  # "evaluate restored": the third evaluation (dense, pruned, restored)
        evaluate, calls = pipeline.evaluate, []

        def third_stops(*args, **kwargs):
            calls.append(1)
            return stop() if len(calls) == 3 else evaluate(*args, **kwargs)

        pipeline.evaluate = third_stops
    sys.exit(main(argv))
    """
)
FAST = test_cli_run.FAST
model_dir = test_cli_run.model_dir  # the tiny model: the fixture of run's own tests
TIMINGS = ("stage_seconds", "stage_peak_rss_gib", "peak_rss_gib", "stage_peak_gpu_gib")
TRAIN_TIMINGS = ("seconds", "seconds_per_step", "cpu_seconds_per_step", "peak_rss_mb", "peak_cuda_mb", "peak_gpu_mb")


def argv(model_dir: Path, output: Path, *extra: str) -> list[str]:
    return ["run", "--model", str(model_dir), "--output", str(output), *FAST, *extra]


@pytest.fixture(scope="module")
def uninterrupted(model_dir, tmp_path_factory):
    output = tmp_path_factory.mktemp("uninterrupted") / "run"
    assert main(argv(model_dir, output)) == 0
    return json.loads((output / "results.json").read_text())


def comparable(summary: dict) -> dict:
    """results.json less what differs between two runs of the same job: timings, memory and the output's path."""
    kept = {key: value for key, value in summary.items() if key not in (*TIMINGS, "paths")}
    kept["settings"] = {key: value for key, value in summary["settings"].items() if key != "output"}
    kept["train"] = {key: value for key, value in summary["train"].items() if key not in TRAIN_TIMINGS}
    return kept


def kill_at(stage: str, arguments: list[str], cwd: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]), "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, "-c", STOPPING_RUN, stage, *arguments], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True, env=env, cwd=cwd)  # fmt: skip
    try:
        for line in child.stdout:
            if line.strip() == "STOPPED":
                break
        else:
            pytest.fail(f"the run exited ({child.wait()}) before reaching {stage}")
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)


@pytest.mark.parametrize(
    ("stage", "reused", "redone"),
    [
        ("calibrate", ["evaluate dense", "prune"], "calibrate"),
        ("evaluate restored", ["evaluate dense", "prune", "calibrate", "evaluate pruned", "train"], "evaluate restored"),
    ],
)
def test_a_run_killed_at_a_stage_resumes_to_the_uninterrupted_results(
    model_dir, uninterrupted, tmp_path, capsys, stage, reused, redone
):
    output = tmp_path / "run"
    kill_at(stage, argv(model_dir, output), tmp_path)
    assert not (output / "results.json").exists()
    recorded = set(json.loads((output / STAGES_FILE).read_text())["stages"])
    assert set(reused) <= recorded and redone not in recorded
    assert main(argv(model_dir, output)) == 2  # without --resume a used output is refused, with the fix named
    assert "--resume" in capsys.readouterr().err
    assert main(argv(model_dir, output, "--resume")) == 0
    said = capsys.readouterr().err
    assert all(f"resume: reusing {name}" in said for name in reused) and f"reusing {redone}" not in said
    resumed = json.loads((output / "results.json").read_text())
    assert comparable(resumed) == comparable(uninterrupted)


def test_changed_settings_redo_what_depends_on_them(model_dir, uninterrupted, tmp_path, capsys):
    output = tmp_path / "run"
    assert main(argv(model_dir, output)) == 0
    capsys.readouterr()
    # Another learning rate: pruning, calibration and the first two evaluations stand; training and what reads it
    # are redone.
    assert main(argv(model_dir, output, "--resume", "--lr", "2e-3")) == 0
    said = capsys.readouterr().err
    for name in ("evaluate dense", "prune", "calibrate", "evaluate pruned"):
        assert f"resume: reusing {name}" in said
    assert "reusing train" not in said and "reusing merge" not in said
    resumed = json.loads((output / "results.json").read_text())
    assert resumed["settings"]["lr"] == 2e-3 and resumed["results"]["dense"] == uninterrupted["results"]["dense"]
    assert resumed["train"]["learning_rate"] == 2e-3
