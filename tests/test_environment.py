"""Importing the package must not change the user's process: no module sets an environment variable (an
``HF_HUB_OFFLINE`` set at import would stop a user's training script from downloading anything)."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Third-party libraries are imported first so that only what the package itself does is compared.
_SCRIPT = r"""
import importlib, json, os, pkgutil, sys
for name in ("torch", "transformers", "peft", "datasets", "accelerate", "huggingface_hub", "safetensors"):
    importlib.import_module(name)
for optional in ("lm_eval", "lm_eval.evaluator", "lm_eval.models.huggingface", "lm_eval.tasks", "matplotlib"):
    try:
        importlib.import_module(optional)
    except ImportError:
        pass
before = dict(os.environ)
import peft_restorelcc
names = sorted(
    module.name
    for module in pkgutil.walk_packages(peft_restorelcc.__path__, "peft_restorelcc.")
    if not module.name.endswith("__main__")  # running the CLI is not importing it
)
for name in names:
    importlib.import_module(name)
after = dict(os.environ)
print(json.dumps({
    "modules": names,
    "changed": {key: [before.get(key), after.get(key)] for key in set(before) | set(after)
                if before.get(key) != after.get(key)},
}))
"""


def test_importing_every_module_leaves_the_environment_unchanged():
    env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "MPLBACKEND"))}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    done = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert "peft_restorelcc.evaluation" in report["modules"] and "peft_restorelcc.cli.run_command" in report["modules"]
    assert all(module.startswith("peft_restorelcc") for module in report["modules"])
    assert report["changed"] == {}
