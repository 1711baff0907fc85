"""Build hooks on top of pyproject.toml: put ``peft_restorelcc_autoload.pth`` into site-packages.

The .pth file makes every interpreter import the tiny ``peft_restorelcc_autoload`` module at start, which registers
RestoreLCC with PEFT when (and only when) ``peft`` is imported, so stock tools load RestoreLCC adapters. A regular
wheel gets the file from ``build_py`` (files at the root of the build folder land in site-packages); an editable
install (``pip install -e``) builds its wheel through ``editable_wheel``, which does not ship the build folder, so the
file is added to that wheel directly.
"""

from __future__ import annotations

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

PTH_NAME = "peft_restorelcc_autoload.pth"
# site runs .pth lines that start with "import". The try keeps a .pth left without its module (a moved editable
# checkout) from printing a traceback at every interpreter start.
PTH_TEXT = (
    "# Registers RestoreLCC with PEFT when peft is imported; PEFT_RESTORELCC_AUTOLOAD=0 switches it off.\n"
    'import sys; exec("try:\\n import peft_restorelcc_autoload\\nexcept ImportError:\\n pass")\n'
)


class BuildPyWithPth(build_py):
    def run(self) -> None:
        super().run()
        if not getattr(self, "editable_mode", False):
            Path(self.build_lib, PTH_NAME).write_text(PTH_TEXT)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        outputs = super().get_outputs(include_bytecode)
        if getattr(self, "editable_mode", False):
            return outputs
        return [*outputs, str(Path(self.build_lib, PTH_NAME))]


class _StrategyWithPth:
    """An editable strategy (setuptools' own) that also writes the .pth file into the editable wheel."""

    def __init__(self, strategy) -> None:
        self.strategy = strategy

    def __enter__(self) -> _StrategyWithPth:
        self.strategy.__enter__()
        return self

    def __exit__(self, *exc_info) -> None:
        self.strategy.__exit__(*exc_info)

    def __call__(self, wheel, files, mapping) -> None:
        self.strategy(wheel, files, mapping)
        wheel.writestr(PTH_NAME, PTH_TEXT.encode("ascii"))


class EditableWheelWithPth(editable_wheel):
    # setuptools >= 64 builds editable wheels here; the strategy is what writes the wheel's files.
    def _select_strategy(self, *args, **kwargs):
        return _StrategyWithPth(super()._select_strategy(*args, **kwargs))


setup(cmdclass={"build_py": BuildPyWithPth, "editable_wheel": EditableWheelWithPth})
