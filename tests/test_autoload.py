"""Stock tools load RestoreLCC adapters with no ``import peft_restorelcc``: the import hook that the installed
``peft_restorelcc_autoload.pth`` runs at interpreter start.

Every check runs in a fresh interpreter (a subprocess) whose code never names peft_restorelcc, so only the hook can
have registered the method. CI installs the package with scripts/install.sh, which installs the .pth file: a
missing hook is a failure here, not a skip.
"""

from __future__ import annotations

import json
import os
import site
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from test_evaluation import make_eval_model, make_tiny_tokenizer
from tiny_models import random_input_ids

import peft_restorelcc_autoload
from peft_restorelcc import RestoreLCCConfig

PTH_NAME = "peft_restorelcc_autoload.pth"
HEADS = {0: [0, 3], 1: [1]}


def run(argv: list[str], tmp_path: Path, **env_overrides: str) -> subprocess.CompletedProcess:
    """``python *argv`` in a fresh interpreter, offline; the hook's switch as set in ``env_overrides`` only."""
    env = {name: value for name, value in os.environ.items() if name != peft_restorelcc_autoload.ENV_VAR}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               HF_DATASETS_CACHE=str(tmp_path / "datasets-cache"), **env_overrides)  # fmt: skip
    return subprocess.run([sys.executable, *argv], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)


def run_python(code: str, tmp_path: Path, **env_overrides: str) -> subprocess.CompletedProcess:
    return run(["-c", textwrap.dedent(code)], tmp_path, **env_overrides)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    """A tiny Llama with a real tokenizer on disk, and a RestoreLCC adapter for it large enough to move the logits."""
    root = tmp_path_factory.mktemp("autoload")
    base = make_eval_model()
    base.save_pretrained(root / "base")
    make_tiny_tokenizer().save_pretrained(root / "base")
    torch.manual_seed(0)
    config = RestoreLCCConfig(init_weights="gaussian", heads=HEADS, init_std=0.5, task_type="CAUSAL_LM")
    model = get_peft_model(make_eval_model(), config)
    model.peft_config["default"].base_model_name_or_path = str(root / "base")
    model.save_pretrained(root / "adapter")
    return {"base": root / "base", "adapter": root / "adapter"}


def in_process_model(saved: dict[str, Path]) -> PeftModel:
    from transformers import AutoModelForCausalLM

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(saved["base"]), saved["adapter"]).eval()


# ------------------------------------------------------------------------------------------------ the install


def test_the_install_put_the_pth_file_into_site_packages() -> None:
    folders = [*site.getsitepackages(), site.getusersitepackages()]
    found = [Path(folder, PTH_NAME) for folder in folders if Path(folder, PTH_NAME).is_file()]
    assert found, (
        f"{PTH_NAME} is in none of {folders}: install the package with scripts/install.sh (pip install . or "
        "pip install -e .), whose build (setup.py) puts it there."
    )
    assert "import peft_restorelcc_autoload" in found[0].read_text()


def test_interpreter_start_loads_the_hook_and_nothing_heavy(tmp_path: Path) -> None:
    result = run_python(
        """
        import json, sys
        from importlib.machinery import PathFinder
        print(json.dumps({"hook": "peft_restorelcc_autoload" in sys.modules,
                          "heavy": sorted({"torch", "peft", "transformers", "peft_restorelcc"} & set(sys.modules)),
                          "before_path_finder": [type(finder).__name__ for finder in
                                                 sys.meta_path[: sys.meta_path.index(PathFinder)]]}))
        """,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    state = json.loads(result.stdout)
    # Only the hook is loaded, and it is asked before the finder that finds peft on sys.path.
    assert state["hook"] and state["heavy"] == [] and "PeftImportFinder" in state["before_path_finder"]


def test_import_peft_registers_the_method_once_and_the_finder_leaves(tmp_path: Path) -> None:
    result = run_python(
        """
        import importlib.util, json, sys
        assert importlib.util.find_spec("peft") is not None  # as transformers asks: finds, loads nothing
        import peft
        from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
        print(json.dumps({"registered": PEFT_TYPE_TO_CONFIG_MAPPING["RESTORELCC"].__name__,
                          "loader_is_peft_own": type(peft.__loader__).__name__,
                          "spec_loader": type(peft.__spec__.loader).__name__,
                          "finder_left": all(type(f).__name__ != "PeftImportFinder" for f in sys.meta_path)}))
        """,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "registered": "RestoreLCCConfig",
        "loader_is_peft_own": "SourceFileLoader",
        "spec_loader": "SourceFileLoader",
        "finder_left": True,
    }
    assert "Warning" not in result.stderr


def test_importing_the_package_first_does_not_recurse(tmp_path: Path) -> None:
    # peft_restorelcc imports peft while it is itself half imported: the hook must leave it alone.
    result = run_python("import peft_restorelcc, peft; print(peft.mapping.PEFT_TYPE_TO_TUNER_MAPPING['RESTORELCC'])",
                        tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "RestoreLCCModel" in result.stdout


def test_a_failing_registration_warns_once_and_peft_still_imports(tmp_path: Path) -> None:
    # A broken install of the package (here: one whose __init__ raises), first on the path.
    broken = tmp_path / "broken" / "peft_restorelcc"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise RuntimeError('simulated broken install')\n")
    python_path = os.pathsep.join([str(broken.parent), os.environ.get("PYTHONPATH", "")])
    result = run_python(
        """
        import peft
        from peft import LoraConfig
        print("peft ok", LoraConfig(r=2).r)
        """,
        tmp_path,
        PYTHONPATH=python_path,
    )
    assert result.returncode == 0, result.stderr
    assert "peft ok 2" in result.stdout
    assert result.stderr.count("could not register the RESTORELCC method") == 1
    assert "simulated broken install" in result.stderr and "PEFT_RESTORELCC_AUTOLOAD=0" in result.stderr


# ------------------------------------------------------------------------------------------------ PEFT's loaders

_LOAD_SCRIPT = """
import torch
from transformers import AutoModelForCausalLM
from peft import PeftModel, AutoPeftModelForCausalLM
ids = torch.load(r"{ids}", weights_only=True)
plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(r"{base}"), r"{adapter}").eval()
auto = AutoPeftModelForCausalLM.from_pretrained(r"{adapter}").eval()
with torch.no_grad():
    torch.save({{"plain": plain(ids).logits, "auto": auto(ids).logits,
                "type": str(plain.peft_config["default"].peft_type)}}, r"{out}")
"""


def test_peft_loaders_in_a_fresh_interpreter_match_in_process(saved, tmp_path: Path) -> None:
    ids = random_input_ids(batch=2, length=10)
    torch.save(ids, tmp_path / "ids.pt")
    script = _LOAD_SCRIPT.format(base=saved["base"], adapter=saved["adapter"], ids=tmp_path / "ids.pt",
                                 out=tmp_path / "logits.pt")  # fmt: skip
    result = run_python(script, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = torch.load(tmp_path / "logits.pt", weights_only=True)

    model = in_process_model(saved)
    with torch.no_grad():
        expected = model(ids).logits
        with model.disable_adapter():
            base_logits = model(ids).logits
    assert "RESTORELCC" in loaded["type"]
    torch.testing.assert_close(loaded["plain"], expected)
    torch.testing.assert_close(loaded["auto"], expected)
    assert (expected - base_logits).abs().max() > 1e-2  # the adapter is applied, not dropped


def test_switched_off_the_old_key_error_comes_back(saved, tmp_path: Path) -> None:
    script = f"""
    from transformers import AutoModelForCausalLM
    from peft import PeftModel
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(r"{saved["base"]}"), r"{saved["adapter"]}")
    """
    result = run_python(script, tmp_path, PEFT_RESTORELCC_AUTOLOAD="0")
    assert result.returncode != 0
    assert "KeyError: 'RESTORELCC'" in result.stderr


# ------------------------------------------------------------------------------------------------ lm-eval's CLI

_TASK = "restorelcc_autoload_mc"
_ITEMS = [
    {"question": "Is the sky blue?", "choices": ["yes", "no"], "label": 0},
    {"question": "Which animal jumps over the lazy dog?", "choices": ["the fox", "the frog", "a wizard"], "label": 0},
    {"question": "Where do deep sea animals live?", "choices": ["on a roof", "beneath the ocean"], "label": 1},
    {"question": "Sarah was a better surgeon than Maria. Who got the harder cases?", "choices": ["Sarah", "Maria"],
     "label": 0},
]  # fmt: skip


def write_task(folder: Path) -> Path:
    """A local multiple_choice task over a jsonl file: lm-eval reads it with the ``json`` builder, offline."""
    folder.mkdir()
    data = folder / "items.jsonl"
    data.write_text("".join(json.dumps(item) + "\n" for item in _ITEMS))
    (folder / f"{_TASK}.yaml").write_text(
        textwrap.dedent(f"""\
        task: {_TASK}
        dataset_path: json
        dataset_kwargs:
          data_files:
            validation: {data}
        output_type: multiple_choice
        validation_split: validation
        doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
        doc_to_choice: "{{{{choices}}}}"
        doc_to_target: label
        metric_list:
          - metric: acc
        metadata:
          version: 1.0
        """)
    )
    return folder


def loglikelihoods(samples: list[dict]) -> list[list[float]]:
    """Per item (by doc_id), the log-likelihood of each choice."""
    ordered = sorted(samples, key=lambda sample: sample["doc_id"])
    return [[float(response[0][0]) for response in sample["resps"]] for sample in ordered]


def flat(nested: list[list[float]]) -> torch.Tensor:
    return torch.tensor([value for values in nested for value in values], dtype=torch.float64)


def in_process_loglikelihoods(model: torch.nn.Module, tokenizer, task_manager) -> list[list[float]]:
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    results = simple_evaluate(
        model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1, device="cpu"),
        tasks=[_TASK], task_manager=task_manager, limit=len(_ITEMS), log_samples=True,
    )  # fmt: skip
    return loglikelihoods(results["samples"][_TASK])


def test_lm_eval_cli_applies_the_adapter_without_an_import(saved, tmp_path: Path) -> None:
    task_dir = write_task(tmp_path / "tasks")
    output = tmp_path / "results"
    model_args = f"pretrained={saved['base']},peft={saved['adapter']},dtype=float32"
    result = run(["-m", "lm_eval", "--model", "hf", "--model_args", model_args, "--tasks", _TASK, "--include_path",
                  str(task_dir), "--device", "cpu", "--batch_size", "1", "--limit", str(len(_ITEMS)),
                  "--output_path", str(output), "--log_samples"], tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    (samples_file,) = output.rglob(f"samples_{_TASK}_*.jsonl")
    cli = loglikelihoods([json.loads(line) for line in samples_file.read_text().splitlines()])
    assert [len(choices) for choices in cli] == [len(item["choices"]) for item in _ITEMS]

    from lm_eval.tasks import TaskManager

    model = in_process_model(saved)
    tokenizer = make_tiny_tokenizer()
    # Only our task: indexing lm-eval's thousands of built-in task files would take longer than the evaluation.
    task_manager = TaskManager(include_path=str(task_dir), include_defaults=False)
    expected = in_process_loglikelihoods(model, tokenizer, task_manager)
    with model.disable_adapter():
        without_adapter = in_process_loglikelihoods(model, tokenizer, task_manager)
    torch.testing.assert_close(flat(cli), flat(expected), rtol=1e-5, atol=1e-4)
    assert (flat(cli) - flat(without_adapter)).abs().max() > 1e-2  # the adapter was applied
