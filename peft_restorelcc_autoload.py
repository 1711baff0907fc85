"""Registers RestoreLCC with PEFT as soon as ``peft`` is imported, so that stock tools load RestoreLCC adapters.

PEFT has no plugin entry point: an adapter of a type PEFT does not know fails to load with ``KeyError:
'RESTORELCC'`` unless ``peft_restorelcc`` was imported first, which nobody can do inside lm-eval's command line,
TRL or a colleague's script. Installing the package puts ``peft_restorelcc_autoload.pth`` into site-packages; its one
line imports this module at interpreter start. This module imports nothing heavy (no torch, no peft): it only puts
a finder at the front of ``sys.meta_path`` that waits for ``import peft``. When that comes, the finder lets the
normal machinery find and run peft, and right after peft's own code has run it imports ``peft_restorelcc``, whose
import registers the method. The finder then removes itself, so later imports do not pass through it.

Switch it off by setting the environment variable ``PEFT_RESTORELCC_AUTOLOAD=0`` (also ``false``, ``no``, ``off``):
then nothing is installed, and a RestoreLCC adapter loads only after an explicit ``import peft_restorelcc``.
An interpreter started with ``python -S`` (no site-packages processing) never runs the hook either.

A failure inside the hook never breaks the interpreter or the import of peft: it is caught and reported once as a
warning (``import peft_restorelcc`` explicitly to see the full error).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

ENV_VAR = "PEFT_RESTORELCC_AUTOLOAD"
_OFF_VALUES = frozenset({"0", "false", "no", "off"})
_TRIGGER = "peft"
_PACKAGE = "peft_restorelcc"


def enabled() -> bool:
    """False when ``PEFT_RESTORELCC_AUTOLOAD`` is set to 0/false/no/off (any case)."""
    return os.environ.get(ENV_VAR, "1").strip().lower() not in _OFF_VALUES


def _warn(message: str) -> None:
    import warnings

    warnings.warn(message, RuntimeWarning, stacklevel=3)


def register_restorelcc() -> None:
    """Import ``peft_restorelcc`` (which registers the method with PEFT); never raises."""
    if _PACKAGE in sys.modules or not enabled():
        # Already imported, or being imported: peft is then imported from inside peft_restorelcc itself.
        return
    try:
        __import__(_PACKAGE)
    except Exception as error:  # noqa: BLE001 - the hook must never break the import of peft
        _warn(
            f"peft_restorelcc could not register the RESTORELCC method with PEFT ({type(error).__name__}: {error}); "
            f"RestoreLCC adapters will not load. peft itself is fine. Run `python -c 'import peft_restorelcc'` for "
            f"the full error, or set {ENV_VAR}=0 to switch this hook off."
        )


class _RunAfterExec:
    """Loader that runs the module's own loader, then the finder's callback; everything else is the original's."""

    def __init__(self, loader, finder: AfterImportFinder) -> None:
        self._loader = loader
        self._finder = finder

    def __getattr__(self, name: str):
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._finder.leave()  # the module is being loaded: the finder's job is done
        # Give the module its real loader back first, so it sees itself exactly as without the hook.
        module.__loader__ = self._loader
        if getattr(module, "__spec__", None) is not None:
            module.__spec__.loader = self._loader
        self._loader.exec_module(module)  # the module's own errors propagate unchanged
        self._finder.callback()


class AfterImportFinder:
    """``sys.meta_path`` entry that wraps the loader of one module so that ``callback`` runs right after the module
    has been executed; it leaves once the module loads. ``peft_restorelcc`` uses it too, to register when peft loads.

    It must not leave at the first ``find_spec``: ``importlib.util.find_spec`` (transformers asks it whether peft is
    installed) finds a spec without loading it.
    """

    def __init__(self, fullname: str, callback: Callable[[], None]) -> None:
        self.fullname = fullname
        self.callback = callback
        self._searching = False

    def find_spec(self, fullname: str, path=None, target=None):
        if fullname != self.fullname or self._searching:
            return None
        self._searching = True  # the search below asks every finder, this one too (under the import lock)
        try:
            spec = _find_spec_elsewhere(self, fullname, path, target)
            if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
                return None  # not installed, or a loader we cannot wrap: the normal search carries on
            spec.loader = _RunAfterExec(spec.loader, self)
            return spec
        except Exception as error:  # noqa: BLE001
            _warn(f"peft_restorelcc's import hook failed ({type(error).__name__}: {error}); {fullname} loads without it.")
            return None  # the normal finders then find the module as if the hook were not there
        finally:
            self._searching = False

    def leave(self) -> None:
        """Remove this finder from ``sys.meta_path`` (idempotent)."""
        sys.meta_path[:] = [finder for finder in sys.meta_path if finder is not self]

    def __repr__(self) -> str:
        return f"<{__name__}.{type(self).__name__} {self.fullname}>"


class PeftImportFinder(AfterImportFinder):
    """The interpreter-start hook: registers RestoreLCC right after ``peft`` has loaded."""

    def __init__(self) -> None:
        super().__init__(_TRIGGER, register_restorelcc)

    def __repr__(self) -> str:
        return f"<{__name__}.{type(self).__name__}>"


def _find_spec_elsewhere(searcher: AfterImportFinder, fullname: str, path, target):
    for finder in list(sys.meta_path):
        find_spec = getattr(finder, "find_spec", None)
        if find_spec is None or finder is searcher:
            continue
        spec = find_spec(fullname, path, target)
        if spec is not None:
            return spec
    return None


def install() -> None:
    """Put the finder first on ``sys.meta_path`` (idempotent); do nothing if switched off or peft is loaded."""
    try:
        if not enabled():
            return
        if _TRIGGER in sys.modules:
            register_restorelcc()
            return
        if not any(isinstance(finder, PeftImportFinder) for finder in sys.meta_path):
            sys.meta_path.insert(0, PeftImportFinder())
    except Exception as error:  # noqa: BLE001 - runs at interpreter start: never break it
        _warn(f"peft_restorelcc's import hook could not be installed ({type(error).__name__}: {error}).")


def uninstall() -> None:
    """Remove the finder from ``sys.meta_path`` (idempotent)."""
    sys.meta_path[:] = [finder for finder in sys.meta_path if not isinstance(finder, PeftImportFinder)]


install()
