"""benchmarks/report.py: docs/benchmarks.md is what the script prints from the committed results files."""

import json
import subprocess
import sys

import pytest
from benchmark_scripts import BENCHMARKS, load_benchmark

ROOT = BENCHMARKS.parent


@pytest.fixture(scope="module")
def report():
    return load_benchmark("report")


def test_the_committed_benchmarks_page_is_what_the_script_prints():
    printed = subprocess.run([sys.executable, str(BENCHMARKS / "report.py")], check=True, capture_output=True,
                             text=True, cwd=ROOT).stdout  # fmt: skip
    assert printed == (ROOT / "docs" / "benchmarks.md").read_text(), (
        "docs/benchmarks.md is stale: run `python benchmarks/report.py > docs/benchmarks.md`"
    )


def test_every_results_file_has_its_section_and_every_recovery_table_is_its_recovery_md(report):
    page = report.render()
    files = report.results_files()
    assert {"recovery.json", "pruning.json", "overhead.json", "calibration.json"} <= {path.name for path in files}
    for path in files:
        assert f"## `{path.relative_to(ROOT)}`" in page
        if path.name == "recovery.json":  # the table the benchmark wrote beside its JSON when it ran
            assert report.markdown_table(json.loads(path.read_text())) + "\n" == (path.parent / "recovery.md").read_text()


def test_the_brief_table_has_one_line_per_row_from_its_file(report):
    brief = report.brief()
    results = json.loads(report.BRIEF_FILE.read_text())
    rows = {row["method"]: row for row in results["rows"]}
    assert brief.startswith(f"From `{report.BRIEF_FILE.relative_to(ROOT)}`")
    lines = brief.splitlines()[4:]
    assert len(lines) == len(report.BRIEF_ROWS)
    for line, name in zip(lines, report.BRIEF_ROWS, strict=True):
        row = rows[name]
        assert f"| {row['trainable_params']:,} | {row['sparsity_after_merge']:.4f} |" in line
        if "runs" in row:
            assert f"{row['gap_recovered_above_chance']:.0%} ± " in line and f"({len(row['seeds'])} seeds)" in line


def test_a_results_file_of_another_shape_is_rendered_from_its_structure(report, tmp_path):
    scaling = {"command": "python benchmarks/scaling.py --sizes 1 2", "device": "cpu",
               "runs": [{"size": 1, "seconds": 0.25}, {"size": 2, "seconds": 0.5}], "totals": {"seconds": 0.75}}  # fmt: skip
    (tmp_path / "scaling.json").write_text(json.dumps(scaling))
    (tmp_path / "notes.json").write_text(json.dumps({"machine": "2 cores"}))
    page = report.render(tmp_path)
    assert "```bash\npython benchmarks/scaling.py --sizes 1 2\n```" in page
    assert "| size | seconds |\n|---|---|\n| 1 | 0.25 |\n| 2 | 0.5 |" in page
    assert "**totals**\n\n| key | value |\n|---|---|\n| seconds | 0.75 |" in page
    assert page.count("The file records no command;") == 1 and "| machine | 2 cores |" in page


def test_a_quantized_recovery_file_gets_its_table_and_plot(report, tmp_path):
    row = {"format": "nf4", "model": "restorelcc", "tasks": {"arc_easy": 0.5}, "avg_acc": 0.5, "perplexity": 61.2,
           "sparsity": 0.5004, "pruned_zeros_kept": 1.0, "quantized_tensors": 420,
           "quantized_tensors_changed_by_merge": 0, "quantized_tensors_changed_on_disk": 0,
           "quantized_tensors_changed_by_merge_after_forward": 0, "size_mib": 165.4,
           "max_logit_diff_reloaded_vs_unmerged": 0.77, "max_logit_diff_merged_after_forward_vs_unmerged": 0.0,
           "max_abs_logit_unmerged": 40.0, "trainable_parameters": 8704}  # fmt: skip
    pruned = {"format": "fp32", "model": "pruned", "tasks": {"arc_easy": 0.5}, "avg_acc": 0.5, "perplexity": 46.6,
              "sparsity": 0.5, "pruned_zeros_kept": 1.0, "size_mib": 516.5}  # fmt: skip
    data = {"command": "python benchmarks/quantized_recovery.py", "settings": {"limit": 2}, "rows": [pruned, row]}
    (tmp_path / "quantized_recovery.json").write_text(json.dumps(data))
    page = report.render(tmp_path)
    assert "```bash\npython benchmarks/quantized_recovery.py\n```\nIts settings: limit `2`." in page
    assert "| fp32 | pruned | 0.500 | 0.500 | 46.60 | 0.500000 | 1.000000 |  | 516.5 |  |  |" in page
    assert "| nf4 | restorelcc | 0.500 | 0.500 | 61.20 | 0.500400 | 1.000000 | 0 / 0 of 420 | 165.4 | 0.77 / 0 (of 40.0) | 8,704 |" in page
