"""Run PEFT's own generic tuner tests against RestoreLCC and print pass/fail/skip counts.

PEFT checks every tuner with the same machinery (``tests/testing_common.py``: ``PeftCommonTester``), driven by two
suites: ``tests/test_custom_models.py`` (plain ``nn.Module``s such as an MLP, no transformers config) and
``tests/test_decoder_models.py`` (tiny causal LMs). This script copies PEFT's ``tests/`` folder into a temporary
directory, points both suites' case lists at RestoreLCC configs only, and runs pytest there:

- custom models: PEFT's ``MLP`` (``lin0``: 10 -> 20, ``lin1``: 20 -> 2) with RestoreLCC on ``lin0`` (2 heads of 5)
  or ``lin1`` (4 heads of 5): every head, some heads, bias only, components only;
- decoder models: PEFT's model ids are hub repositories; offline, tiny random Llama, Qwen2, GPT-2 and OPT models
  (tests/tiny_models.py) are saved locally under the same kind of names (PEFT's skips look at the name) and used
  instead. Tests that load a tokenizer or a dataset from the hub cannot run offline and are counted as such.

Tests of the suites that do not take a config (LoRA-, DoRA-, PVeRA-specific tests in the same classes) are
deselected: they test other tuners. Every skip is printed with PEFT's own reason.

PEFT's tests are read from a checkout (``--peft-repo``: the repository root, its ``tests`` folder or a bare git
directory); without one the
script tries ``git clone --depth 1 --branch v<installed peft>`` (needs network). Use the tests of a PEFT version
close to the installed one: the suites import every config class they test.

    python benchmarks/peft_generic_tests.py --peft-repo /path/to/peft [--suite custom decoder] [--json out.json]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# The RestoreLCC cases for each suite. Every case is run with PEFT's whole battery of parametrized tests.
CUSTOM_CASES = """[
    ("RestoreLCC lin0 all heads", "MLP", RestoreLCCConfig, {"target_modules": ["lin0"], "num_heads": 2}),
    ("RestoreLCC lin1 all heads", "MLP", RestoreLCCConfig, {"target_modules": ["lin1"], "num_heads": 4}),
    ("RestoreLCC lin1 some heads k3", "MLP", RestoreLCCConfig,
     {"target_modules": ["lin1"], "num_heads": 4, "heads": {0: [1, 3]}, "num_components": 3}),
    ("RestoreLCC lin1 bias only", "MLP", RestoreLCCConfig,
     {"target_modules": ["lin1"], "head_dim": 5, "use_components": False}),
    ("RestoreLCC lin1 components only", "MLP", RestoreLCCConfig,
     {"target_modules": ["lin1"], "head_dim": 5, "use_bias": False}),
]"""
DECODER_CASES = """[
    (RestoreLCCConfig, {"task_type": "CAUSAL_LM", "target_modules": None}),
    (RestoreLCCConfig, {"task_type": "CAUSAL_LM", "target_modules": None, "heads": {0: [1], 1: [0, 3]}}),
]"""
# Local stand-ins for PEFT's hub model ids; the names keep the architecture words PEFT's skips test for.
DECODER_MODELS = {
    "llama": "tiny-random-LlamaForCausalLM",
    "qwen2": "tiny-dummy-qwen2",
    "gpt2": "tiny-random-GPT2LMHeadModel",
    "opt": "tiny-random-OPTForCausalLM",
}

# What adding RestoreLCC to PEFT would change in its test files: PEFT's suites name the methods that support a
# feature in hard-coded lists, so a new method is skipped until it is added there. Each entry: file, text, new text,
# why. Applied to the copy only (--as-is runs PEFT's files unchanged); a text that is not found is reported.
IMPORT_LINE = "from peft_restorelcc import RestoreLCCConfig  # added by peft_generic_tests.py\n"
UPSTREAM_PATCHES = [
    (
        "testing_common.py",
        "if config_cls not in (IA3Config, LoHaConfig, LoKrConfig, LoraConfig):",
        "if config_cls not in (IA3Config, LoHaConfig, LoKrConfig, LoraConfig, RestoreLCCConfig):",
        "RestoreLCC wraps GPT-2's Conv1D attn.c_proj",
    ),
    (
        "testing_common.py",
        "if config_cls not in (LoraConfig, RoadConfig):",
        "if config_cls not in (LoraConfig, RoadConfig, RestoreLCCConfig):",
        "RestoreLCC supports mixed adapter batches (adapter_names=...)",
    ),
    (
        "testing_common.py",
        "if config_cls not in (LoraConfig,):\n"
        "            # note: RoAD supports mixed adapter batches but not beam search",
        "if config_cls not in (LoraConfig, RestoreLCCConfig):",
        "RestoreLCC supports mixed adapter batches with beam search (num_beams repeats adapter_names)",
    ),
    (
        "test_decoder_models.py",
        'if config_cls != LoraConfig:\n            pytest.skip("Mixed adapter batches not supported for this config.")',
        'if config_cls not in (LoraConfig, RestoreLCCConfig):\n            pytest.skip("Mixed adapter batches not '
        'supported for this config.")',
        "RestoreLCC supports mixed adapter batches (forward and generate)",
    ),
    (
        "test_decoder_models.py",
        "if isinstance(config_cls, BeftConfig):\n        return",
        "if config_cls is not BeftConfig:\n        return",
        "PEFT's check_beft_config tests isinstance() on a class (always False), so BEFT's Llama skip hit every method",
    ),
]


def apply_upstream_patches(tests: Path) -> list[str]:
    """Apply UPSTREAM_PATCHES to the copied files; returns one line per patch saying what happened."""
    lines = []
    for filename, old, new, why in UPSTREAM_PATCHES:
        path = tests / filename
        text = path.read_text()
        count = text.count(old)
        if count:
            text = text.replace(old, new)
            if IMPORT_LINE not in text:
                text = text.replace("\nimport pytest\n", "\nimport pytest\n" + IMPORT_LINE, 1)
            path.write_text(text)
        lines.append(f"{'applied' if count else 'NOT FOUND'} x{count} in {filename}: {why}")
    return lines


CONFTEST = '''
import sys
import types

import pytest

# testing_common imports diffusers for its Stable Diffusion tests only; give it a stand-in when it is not installed.
try:
    import diffusers  # noqa: F401
except ImportError:
    class StableDiffusionPipeline:  # a class, so that the suites' isinstance checks say "no"
        pass

    stub = types.ModuleType("diffusers")
    stub.StableDiffusionPipeline = StableDiffusionPipeline
    sys.modules["diffusers"] = stub

import peft_restorelcc  # noqa: F401,E402  (registers RESTORELCC with PEFT)
from peft_restorelcc import RestoreLCCConfig  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """Keep the tests that run a RestoreLCC config; the others test other tuners."""
    kept, dropped = [], []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        (kept if params.get("config_cls") is RestoreLCCConfig else dropped).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
    items[:] = kept
'''

SUITE_MODULE = '''
import os

from peft_restorelcc import RestoreLCCConfig

from . import {module} as suite

CASES = {cases}
{replace}


class TestRestoreLCC{name}(suite.{cls}):
    pass
'''


def peft_tests_folder(peft_repo: str | None, workdir: Path) -> Path:
    """PEFT's tests folder: from ``peft_repo`` or a shallow clone of the installed version's tag."""
    if peft_repo:
        root = Path(peft_repo)
        if not (root / "tests").exists() and (root / "HEAD").exists():
            # A bare git directory (a mirror without a work tree): export its tests folder.
            export = workdir / "peft-export"
            export.mkdir()
            archive = subprocess.run(["git", "--git-dir", str(root), "archive", "HEAD", "tests"], capture_output=True)
            if archive.returncode != 0:
                raise SystemExit(archive.stderr.decode(errors="replace")[-1000:])
            subprocess.run(["tar", "-x", "-C", str(export)], input=archive.stdout, check=True)
            root = export
        folder = root / "tests" if (root / "tests" / "testing_common.py").exists() else root
        if not (folder / "testing_common.py").exists():
            raise SystemExit(f"{peft_repo} has no tests/testing_common.py; pass PEFT's repository root or tests.")
        return folder
    import peft

    target = workdir / "peft-clone"
    command = ["git", "clone", "--quiet", "--depth", "1", "--branch", f"v{peft.__version__}"]
    result = subprocess.run([*command, "https://github.com/huggingface/peft", str(target)], capture_output=True)
    if result.returncode != 0:
        raise SystemExit(
            "Could not clone PEFT's repository (offline?). Pass a checkout with --peft-repo.\n"
            + result.stderr.decode(errors="replace")[-1000:]
        )
    return target / "tests"


def save_decoder_models(folder: Path) -> dict[str, str]:
    """Tiny random decoder models saved under PEFT-like names; returns {name: path}."""
    sys.path.insert(0, str(REPO / "tests"))
    from tiny_models import make_tiny_model

    paths = {}
    for architecture, name in DECODER_MODELS.items():
        path = folder / name
        make_tiny_model(architecture).save_pretrained(path)
        paths[name] = str(path)
    return paths


def write_suites(tests: Path, suites: list[str], model_paths: dict[str, str]) -> list[str]:
    files = []
    if "custom" in suites:
        (tests / "test_restorelcc_custom.py").write_text(
            SUITE_MODULE.format(
                module="test_custom_models",
                cases=CUSTOM_CASES,
                replace="suite.TEST_CASES[:] = CASES",
                name="CustomModel",
                cls="TestPeftCustomModel",
            )
        )
        files.append("tests/test_restorelcc_custom.py")
    if "decoder" in suites:
        replace = textwrap.dedent(
            f"""
            suite.ALL_CONFIGS[:] = CASES
            MODELS = {json.dumps(list(model_paths.values()))}
            suite.PEFT_DECODER_MODELS_TO_TEST[:] = MODELS
            suite.SMALL_GRID_MODELS[:] = MODELS
            """
        )
        (tests / "test_restorelcc_decoder.py").write_text(
            SUITE_MODULE.format(
                module="test_decoder_models",
                cases=DECODER_CASES,
                replace=replace,
                name="DecoderModels",
                cls="TestDecoderModels",
            )
        )
        files.append("tests/test_restorelcc_decoder.py")
    return files


def summarize(report: Path) -> dict:
    """Counts, skip reasons and failures from pytest's JUnit XML."""
    counts = collections.Counter()
    skips: collections.Counter = collections.Counter()
    failures = []
    for case in ET.parse(report).getroot().iter("testcase"):
        name = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
        skipped = case.find("skipped")
        failed = case.find("failure") if case.find("failure") is not None else case.find("error")
        if skipped is not None:
            counts["skipped"] += 1
            skips[(skipped.get("message") or "").strip()[:200]] += 1
        elif failed is not None:
            counts["failed"] += 1
            failures.append({"test": name, "message": (failed.get("message") or "").strip()[:300]})
        else:
            counts["passed"] += 1
    return {"counts": dict(counts), "skips": dict(skips.most_common()), "failures": failures}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peft-repo", help="PEFT checkout (repository root or its tests folder)")
    parser.add_argument("--suite", nargs="+", choices=["custom", "decoder"], default=["custom", "decoder"])
    parser.add_argument("-k", dest="keyword", help="pytest -k expression, to run a subset")
    parser.add_argument("--json", help="also write the summary here")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory and print its path")
    parser.add_argument("--as-is", action="store_true", help="run PEFT's files without UPSTREAM_PATCHES")
    args = parser.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="peft-generic-"))
    try:
        source = peft_tests_folder(args.peft_repo, workdir)
        run_root = workdir / "run"
        shutil.copytree(source, run_root / "tests", ignore=shutil.ignore_patterns("__pycache__", "regression"))
        # PEFT's own conftest adds options and deprecation checks the suites rely on; ours goes one level up.
        (run_root / "conftest.py").write_text(CONFTEST)
        patch_lines = [] if args.as_is else apply_upstream_patches(run_root / "tests")
        model_paths = save_decoder_models(workdir / "models") if "decoder" in args.suite else {}
        files = write_suites(run_root / "tests", args.suite, model_paths)
        report = workdir / "report.xml"
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}", *files]
        if args.keyword:
            command += ["-k", args.keyword]
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(REPO), str(run_root), os.environ.get("PYTHONPATH", "")]),
            # Nothing is downloaded: tests that need the hub fail fast instead of waiting for timeouts.
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
        }
        result = subprocess.run(command, cwd=run_root, env=env, capture_output=True, text=True)
        if not report.exists():
            print(result.stdout[-5000:], result.stderr[-5000:], sep="\n")
            return 2
        summary = summarize(report)
        summary["pytest_tail"] = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
        summary["upstream_patches"] = patch_lines
        counts = summary["counts"]
        if patch_lines:
            print("what adding RestoreLCC to PEFT's feature lists changes in the copied tests:")
            for line in patch_lines:
                print(f"  {line}")
        print(f"PEFT generic tests against RestoreLCC ({', '.join(args.suite)}): {summary['pytest_tail']}")
        print(
            f"passed {counts.get('passed', 0)}, failed {counts.get('failed', 0)}, skipped {counts.get('skipped', 0)}"
        )
        if summary["skips"]:
            print("\nskips, by PEFT's reason:")
            for reason, number in summary["skips"].items():
                print(f"  {number:4d}  {reason}")
        if summary["failures"]:
            print("\nfailures:")
            for failure in summary["failures"]:
                print(f"  {failure['test']}\n      {failure['message'][:200]}")
        if args.json:
            Path(args.json).write_text(json.dumps(summary, indent=1))
        return 0 if not summary["failures"] else 1
    finally:
        if args.keep:
            print(f"\nkept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
