"""peft_restorelcc: RestoreLCC as a PEFT tuner type.

Importing this package registers the ``RESTORELCC`` method with PEFT: ``peft.PeftType.RESTORELCC`` becomes a member
of PEFT's enum and the method enters PEFT's tables, so ``get_peft_model``, ``PeftModel.from_pretrained`` and
``AutoPeftModelForCausalLM`` know it. An installed package also imports itself right after ``peft`` is imported
(``peft_restorelcc_autoload``), so no import is needed; with ``PEFT_RESTORELCC_AUTOLOAD=0`` import it first.

The tuner itself is ``peft_restorelcc.tuner`` (standalone: torch, transformers and peft only). This package adds the
family-specific merge policy (``io.merge_policy``): a merged model keeps its compensation through
``save_pretrained`` and a stock ``from_pretrained``. ``docs/architecture.md`` says which folder holds which stage.

This face loads neither torch nor peft itself, so that ``restorelcc --help`` answers at once: the registration runs
when peft is loaded (at once if it already is), and the public names load on first use.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
import types
import warnings
from collections.abc import Callable
from typing import Any

from peft_restorelcc_autoload import AfterImportFinder

__version__ = "0.1.0"
__all__ = ["hub", "RestoreLCCConfig", "RestoreLCCLayer", "RestoreLCCModel", "Linear", "restorelcc_layers", "PEFT_TYPE"]

# The public names, all from the tuner; loaded on first use.
_PUBLIC = [name for name in __all__ if name != "hub"]

# Module paths of 0.1.0 that moved when the package was laid out by stage -> the modules that hold their names
# now (searched in order). The old paths keep working for one release and warn with the new path.
_MOVED = {
    "assets": ("io.embedded", "io.devices", "io.models"),
    "compressed": ("io.compressed",),
    "conversion": ("io.conversion",),
    "devices": ("io.devices",),
    "export": ("io.export", "io.merge_policy", "io.compressed"),
    "files": ("io.files",),
    "hub": ("io.push",),
    "integrity": ("io.checks",),
    "logits": ("training.logits", "training.choices"),
    "masked_lora": ("compare.masked_lora",),
    "merged_checks": ("compare.merged_checks",),
    "recovery": ("evaluation.statistics",),
    "user_data": ("data.user", "data.choices"),
}


def _quiet_bitsandbytes_kernel_fetch(record: logging.LogRecord) -> bool:
    # bitsandbytes >= 0.50 on CPUs with AVX512-BF16, when the `kernels` package is installed, tries to fetch a CPU
    # kernel from the Hub as it is imported (by peft) and logs this when it cannot (offline, or the repository is
    # not on the remote-code allowlist); it then runs its own kernel. Only that one message is dropped, so every
    # `restorelcc` command's error stays one line.
    return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward from kernels-community")


class _MovedModule(types.ModuleType):
    """Stands at an old module path: each name read from it warns and comes from the module that holds it now."""

    def __init__(self, old: str, new: tuple[str, ...]) -> None:
        super().__init__(f"{__name__}.{old}", f"Moved: see {', '.join(f'{__name__}.{path}' for path in new)}.")
        self._new = new

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)  # import machinery and tools probe dunders: no warning, no import
        for path in self._new:
            module = importlib.import_module(f"{__name__}.{path}")
            if hasattr(module, name):
                warnings.warn(
                    f"{self.__name__}.{name} moved to {module.__name__}.{name}; the old path goes in the next release.",
                    DeprecationWarning,
                    stacklevel=2,
                )
                return getattr(module, name)
        raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")


def lazy_face(package: str, exports: dict[str, tuple[str, ...]]) -> tuple[Callable[[str], Any], list[str]]:
    """``__getattr__`` (PEP 562) and ``__all__`` of a package face: ``exports`` maps a module (relative to
    ``package``) to the names it defines; each name, and each submodule, loads on first use and is then a plain
    attribute. So the command line reads a stage's ``choices`` without importing torch."""
    where = {name: module for module, names in exports.items() for name in names}

    def __getattr__(name: str) -> Any:
        if name in where:
            value = getattr(importlib.import_module(where[name], package), name)
        elif not name.startswith("__") and importlib.util.find_spec(f"{package}.{name}") is not None:
            value = importlib.import_module(f"{package}.{name}")  # a submodule, as an eager face had it loaded
        else:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        setattr(sys.modules[package], name, value)  # later reads skip this function
        return value

    return __getattr__, sorted(name for name in where if not name.startswith("_"))


_lazy_getattr, _ = lazy_face(__name__, {".tuner": tuple(_PUBLIC)})


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        return sys.modules[f"{__name__}.{name}"]
    return _lazy_getattr(name)


def _register_with_peft() -> None:
    """Register RESTORELCC and MASKED_LORA with PEFT and install the family merge policy; idempotent (it imports
    torch and peft)."""
    importlib.import_module(f"{__name__}.tuner").register()
    importlib.import_module(f"{__name__}.io.merge_policy").install_merge_policy()
    masked_lora = importlib.import_module(f"{__name__}.compare.masked_lora")
    if hasattr(masked_lora, "register"):  # one still loading (it imported peft) registers itself as it finishes
        masked_lora.register()


def _load_tuner() -> None:
    # Right after peft loaded. A tuner still loading is what imported peft: its own finder registers it.
    if f"{__name__}.tuner" not in sys.modules:
        importlib.import_module(f"{__name__}.tuner")


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_quiet_bitsandbytes_kernel_fetch)
for _old, _new in _MOVED.items():
    sys.modules.setdefault(f"{__name__}.{_old}", _MovedModule(_old, _new))
if "peft" in sys.modules:
    _register_with_peft()  # torch and peft are loaded already: nothing to save by waiting
else:
    # The tuner registers itself as it loads; the merge policy lives outside it, so it is installed right after.
    sys.meta_path.insert(0, AfterImportFinder(f"{__name__}.tuner", _register_with_peft))
    sys.meta_path.insert(0, AfterImportFinder("peft", _load_tuner))
