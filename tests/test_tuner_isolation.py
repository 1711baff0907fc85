"""The tuner folder stands alone: it imports torch, transformers, peft and the standard library only, so it could be
copied into ``peft/tuners/restorelcc/`` with only the import path changed."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import peft_restorelcc

TUNER = Path(peft_restorelcc.__file__).parent / "tuner"
ALLOWED_THIRD_PARTY = {"torch", "transformers", "peft"}


def imports_of(path: Path) -> list[tuple[str, int]]:
    """(module, relative level) of every import statement in a file, including those inside functions."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.extend((alias.name, 0) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            found.append((node.module or "", node.level))
    return found


@pytest.mark.parametrize("path", sorted(TUNER.glob("*.py")), ids=lambda path: path.name)
def test_tuner_file_imports_only_torch_transformers_peft_and_stdlib(path):
    bad = []
    for module, level in imports_of(path):
        top = module.split(".")[0]
        if level == 1:
            # A sibling inside the tuner folder, which must exist there.
            if top and not (TUNER / f"{top}.py").exists():
                bad.append(f".{module}")
        elif level > 1:
            bad.append("." * level + module)  # reaches out of the tuner folder into the package
        elif top not in ALLOWED_THIRD_PARTY and top not in sys.stdlib_module_names:
            bad.append(module)
    assert not bad, f"{path.name} imports {bad}; the tuner may import only torch, transformers, peft and stdlib"


def test_the_tuner_folder_works_as_a_copy_outside_the_package(tmp_path):
    """A copy under another name registers, wraps, merges and saves without peft_restorelcc being importable."""
    shutil.copytree(TUNER, tmp_path / "restorelcc_copy", ignore=shutil.ignore_patterns("__pycache__"))
    code = textwrap.dedent(
        """
        import sys, warnings
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM
        from peft import PeftModel, get_peft_model
        import restorelcc_copy
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2)
        base = LlamaForCausalLM(config).eval()
        inputs = torch.randint(0, 50, (1, 6))
        reference = base(inputs).logits
        model = get_peft_model(base, restorelcc_copy.RestoreLCCConfig(heads={0: [1]}, init_weights=False)).eval()
        adapted = model(inputs).logits
        assert (adapted - reference).abs().max() > 1e-4
        model.save_pretrained(sys.argv[1])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            merged = model.merge_and_unload()
        # Without the package's family policy the tuner still says that the merge created a bias.
        assert any("have no bias" in str(w.message) for w in caught), [str(w.message) for w in caught]
        torch.testing.assert_close(merged(inputs).logits, adapted)
        torch.manual_seed(0)
        loaded = PeftModel.from_pretrained(LlamaForCausalLM(config).eval(), sys.argv[1])
        torch.testing.assert_close(loaded(inputs).logits, adapted, rtol=0, atol=0)
        assert not any(name.split(".")[0] == "peft_restorelcc" for name in sys.modules)
        print("ok")
        """
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "PEFT_RESTORELCC_AUTOLOAD": "0"}
    result = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "saved")], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-1] == "ok"


def test_the_architecture_table_exists_once():
    """Export's family sets and the pruner's list derive from (or stay within) the tuner's table."""
    from peft_restorelcc.io import export
    from peft_restorelcc.pruning import STRUCTURED_MODEL_TYPES
    from peft_restorelcc.tuner.heads import DEFAULT_TARGET_MODULES, KNOWN_ARCHITECTURES, model_types_with_output_bias

    assert export.ATTENTION_BIAS_SWITCH == model_types_with_output_bias("switch")
    assert export.NO_OUTPUT_BIAS == model_types_with_output_bias("never")
    assert {arch.output_bias for arch in KNOWN_ARCHITECTURES.values()} <= {"switch", "always", "never"}
    assert DEFAULT_TARGET_MODULES == {name: arch.output_projection for name, arch in KNOWN_ARCHITECTURES.items()}
    # Structured pruning rewrites q/k/v/o_proj: a capability list, but only of known o_proj families.
    assert all(DEFAULT_TARGET_MODULES[name] == "self_attn.o_proj" for name in STRUCTURED_MODEL_TYPES)
