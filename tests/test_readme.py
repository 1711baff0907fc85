"""The README is a front door: short, every link resolves, its test command is CI's, its results table generated."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MAX_LINES = 300

# [text](target) in markdown, skipping images' leading "!" (they are links too and must resolve as well).
LINK = re.compile(r"\]\(([^)\s]+)\)")


def readme_text() -> str:
    return README.read_text(encoding="utf-8")


def test_readme_is_at_most_300_lines() -> None:
    assert len(readme_text().splitlines()) <= MAX_LINES


def test_every_relative_link_in_the_docs_resolves() -> None:
    documents = [README, *sorted((ROOT / "docs").glob("*.md"))]
    missing = []
    for document in documents:
        for target in LINK.findall(document.read_text(encoding="utf-8")):
            if re.match(r"^[a-z]+://", target) or target.startswith("#") or target.startswith("mailto:"):
                continue
            path = (document.parent / target.split("#", 1)[0]).resolve()
            if not path.exists():
                missing.append(f"{document.relative_to(ROOT)} -> {target}")
    assert missing == []


def test_ci_runs_exactly_the_readmes_test_command() -> None:
    test_command = "bash scripts/test.sh"
    assert test_command in readme_text()
    ci_lines = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert ci_lines[-1] == test_command


def report_output(*flags: str) -> str:
    """What ``benchmarks/report.py`` prints with ``flags``, stripped."""
    return subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "report.py"), *flags],
        check=True,
        capture_output=True,
        text=True,
        cwd=ROOT,
    ).stdout.strip()


def test_readmes_results_table_is_what_the_report_script_prints() -> None:
    brief = report_output("--brief")
    assert brief, "benchmarks/report.py --brief printed nothing"
    assert brief in readme_text()


def test_readmes_main_job_cost_is_what_the_report_script_prints() -> None:
    """The main job's time is a range over the machines it was timed on, generated from its results file."""
    sentence = report_output("--main-job")
    assert " to " in sentence and "CPU:" in sentence, sentence
    assert sentence in readme_text()


def test_readmes_comparison_table_is_what_the_report_script_prints() -> None:
    """The README's `restorelcc compare` table is generated from its results file, with the command that made it."""
    table = report_output("--compare")
    assert "made by `restorelcc compare" in table and "| restorelcc |" in table and "| lora |" in table, table
    assert table in readme_text()


def test_readmes_finding_on_the_deciding_comparison_is_what_the_report_script_prints() -> None:
    """The README's sentence on RestoreLCC against the LoRAs that keep the zeros (Gemma3-270M), with its paired
    standard errors, is generated from its results file."""
    sentence = report_output("--compare-finding")
    assert "Masked LoRA - RestoreLCC in mean accuracy" in sentence and "paired standard error" in sentence, sentence
    assert sentence in readme_text()
