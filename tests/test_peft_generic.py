"""PEFT's own generic tuner tests against RestoreLCC (benchmarks/peft_generic_tests.py), in the slow tier.

Needs PEFT's test files, which are not part of this repository: set ``PEFT_REPO`` to a PEFT checkout (repository
root, its tests folder or a bare git directory) of a version close to the installed one; skipped otherwise.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("PEFT_REPO"), reason="set PEFT_REPO to a PEFT checkout to run PEFT's tests")
def test_peft_generic_tests_pass(tmp_path):
    summary_path = tmp_path / "summary.json"
    script = REPO / "benchmarks" / "peft_generic_tests.py"
    command = [sys.executable, str(script), "--peft-repo", os.environ["PEFT_REPO"], "--json", str(summary_path)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    summary = json.loads(summary_path.read_text())
    assert summary["counts"].get("passed", 0) > 400, result.stdout[-3000:]
    # The only failures allowed: Qwen2 has no config switch for an o_proj bias, so a merged Qwen2 saved and reloaded
    # by stock transformers loses the compensation (the merge warns; export refuses it).
    unexpected = [failure for failure in summary["failures"] if not (
        "test_merge_layers[" in failure["test"] and "qwen2" in failure["test"]
    )]
    assert not unexpected, unexpected
