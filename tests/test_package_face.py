"""The package's face: ``import peft_restorelcc`` registers the method without loading torch itself, the command
line answers --help and bad flag values without torch, and the 0.1 module paths still work with a warning."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

import peft_restorelcc

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "peft", "datasets", "numpy")


def _fresh(code: str, **env: str) -> dict:
    """Run ``code`` in a fresh interpreter; it prints one JSON line, returned here."""
    environment = {**os.environ, **env}
    environment["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=environment, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("autoload", ["1", "0"])
def test_importing_the_package_loads_nothing_heavy_and_still_registers(autoload: str) -> None:
    state = _fresh(
        f"""
        import json, sys
        import peft_restorelcc
        heavy = [name for name in {HEAVY!r} if name in sys.modules]
        import peft
        from peft_restorelcc.tuner.model import RestoreLCCModel
        print(json.dumps({{"heavy": heavy, "member": peft.PeftType.RESTORELCC.value,
                          "policy": RestoreLCCModel.merge_policy is not None}}))
        """,
        PEFT_RESTORELCC_AUTOLOAD=autoload,
    )
    assert state == {"heavy": [], "member": "RESTORELCC", "policy": True}


def test_a_stage_imported_first_registers_with_the_merge_policy() -> None:
    # The calibration imports the tuner, which imports peft while it loads: the registration waits for the tuner.
    state = _fresh(
        """
        import json
        from peft_restorelcc.calibration import build_restorelcc_model
        from peft.utils.peft_types import PeftType
        from peft_restorelcc.tuner.model import RestoreLCCModel
        print(json.dumps([PeftType.RESTORELCC.value, RestoreLCCModel.merge_policy is not None]))
        """
    )
    assert state == ["RESTORELCC", True]


BAD_VALUES = {
    "prune": (["prune", "--model", "smollm2-135m", "--method", "wanda", "--sparsity", "1.5", "--output", "OUT"],
              "sparsity=1.5 is outside [0, 1): pass the fraction of weights to zero, e.g. 0.5."),
    "run": (["run", "--sparsity", "1.5", "--output", "OUT"], "--sparsity must be in [0, 1), got 1.5."),
    "compare": (["compare", "--prune", "wanda:1.5", "--output", "OUT"],
                "--prune 'wanda:1.5': the ratio must be in (0, 1), got 1.5"),
    "train": (["train", "--model", "x", "--adapter", "y", "--batch-size", "0", "--output", "OUT"],
              "--batch-size 0 must be >= 1."),
    "eval": (["eval", "--model", "x", "--limit", "0"], "--limit must be a positive number of items, got 0"),
}  # fmt: skip
HELP = [["--help"], *([command, "--help"] for command in ("prune", "calibrate", "train", "merge", "eval", "run", "compare"))]


def _main_in_a_fresh_interpreter(argv: list[str]) -> dict:
    return _fresh(
        f"""
        import contextlib, io, json, sys
        from peft_restorelcc.cli import main
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main({argv!r})
            except SystemExit as stop:
                code = stop.code
        print(json.dumps({{"code": code, "err": err.getvalue(), "heavy": [n for n in {HEAVY!r} if n in sys.modules]}}))
        """
    )


@pytest.mark.parametrize("argv", HELP, ids=lambda argv: " ".join(argv))
def test_help_loads_nothing_heavy(argv: list[str]) -> None:
    state = _main_in_a_fresh_interpreter(argv)
    assert (state["code"], state["heavy"]) == (0, [])


@pytest.mark.parametrize("command", sorted(BAD_VALUES))
def test_a_bad_flag_value_is_one_line_before_anything_heavy_loads(command: str, tmp_path: Path) -> None:
    argv, message = BAD_VALUES[command]
    state = _main_in_a_fresh_interpreter([str(tmp_path / "out") if arg == "OUT" else arg for arg in argv])
    assert state == {"code": 2, "err": f"restorelcc {command}: error: {message}\n", "heavy": []}


# Paths of 0.1 that the README, docs/ or the benchmarks named, with where they live now.
MOVED = [
    ("export", "save_merged", "peft_restorelcc.io.export"),
    ("export", "save_merged_packed", "peft_restorelcc.io.export"),
    ("export", "install_merge_policy", "peft_restorelcc.io.merge_policy"),
    ("hub", "push_to_hub", "peft_restorelcc.io.push"),
    ("assets", "load_model", "peft_restorelcc.io.models"),
    ("assets", "load_tokenizer", "peft_restorelcc.io.models"),
    ("assets", "resolve_model_path", "peft_restorelcc.io.models"),
    ("assets", "default_device", "peft_restorelcc.io.devices"),
    ("assets", "EMBEDDED_MODELS", "peft_restorelcc.io.embedded"),
    ("recovery", "training_memory_bytes", "peft_restorelcc.evaluation.statistics"),
    ("logits", "parse_batch_size", "peft_restorelcc.training.choices"),
    ("user_data", "read_training_file", "peft_restorelcc.data.user"),
    ("files", "staged_output_dir", "peft_restorelcc.io.files"),
    ("integrity", "json_safe", "peft_restorelcc.io.checks"),
    ("compressed", "sparse_format", "peft_restorelcc.io.compressed"),
    ("conversion", "convert_to_llama", "peft_restorelcc.io.conversion"),
    ("merged_checks", "merged_measures", "peft_restorelcc.compare.merged_checks"),
    ("devices", "input_device", "peft_restorelcc.io.devices"),
    ("masked_lora", "MaskedLoraConfig", "peft_restorelcc.compare.masked_lora"),
]


@pytest.mark.parametrize("old,name,new", MOVED, ids=[f"{old}.{name}" for old, name, _ in MOVED])
def test_an_old_path_works_and_warns_with_the_new_one(old: str, name: str, new: str) -> None:
    import importlib

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = getattr(importlib.import_module(f"peft_restorelcc.{old}"), name)
    assert value is getattr(importlib.import_module(new), name)
    messages = [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)]
    assert messages == [f"peft_restorelcc.{old}.{name} moved to {new}.{name}; the old path goes in the next release."]


def test_from_import_of_an_old_path_warns() -> None:
    with pytest.warns(DeprecationWarning, match=r"peft_restorelcc\.io\.export\.save_merged"):
        from peft_restorelcc.export import save_merged  # noqa: F401
    with pytest.warns(DeprecationWarning, match=r"peft_restorelcc\.io\.push\.push_to_hub"):
        assert callable(peft_restorelcc.hub.push_to_hub)


def test_the_documented_paths_that_did_not_move_do_not_warn() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        from peft_restorelcc import RestoreLCCConfig, data, pipeline  # noqa: F401
        from peft_restorelcc.calibration import build_restorelcc_model, calibrate  # noqa: F401
        from peft_restorelcc.io import load_model, load_tokenizer  # noqa: F401

        assert callable(data.instruction_examples) and callable(pipeline.run_job)


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError):
        peft_restorelcc.no_such_name  # noqa: B018
    with pytest.raises(AttributeError):
        peft_restorelcc.export.no_such_name  # noqa: B018
