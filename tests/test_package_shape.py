"""The package's shape, read with ``ast`` (scripts/package_shape.py): at most ten rooms at the top, arrows one way,
the package's own modules imported at the top of the file outside ``cli/``, and few functions over 60 lines."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _load_script():
    spec = importlib.util.spec_from_file_location("package_shape", REPO / "scripts" / "package_shape.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


MEASURE = _load_script().measure
SHAPE = MEASURE(REPO / "peft_restorelcc")


def test_at_most_ten_entries_at_the_top_of_the_package() -> None:
    assert len(SHAPE.top_entries) <= 10, SHAPE.top_entries


def test_no_import_cycle_between_the_package_modules() -> None:
    assert SHAPE.cycles == [], SHAPE.cycles


def test_no_package_import_inside_a_function_outside_the_cli() -> None:
    assert SHAPE.function_imports == [], SHAPE.function_imports


def test_few_long_functions() -> None:
    assert len(SHAPE.long_functions) <= 5, SHAPE.long_functions


def test_the_measure_sees_a_cycle_and_an_import_inside_a_function(tmp_path: Path) -> None:
    """The checks above would fail on a regression: a planted cycle and a planted late import are found."""
    package = tmp_path / "peft_restorelcc"
    (package / "stage").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "stage" / "__init__.py").write_text("from .. import lazy_face\n__getattr__, __all__ = lazy_face(__name__, {'.a': ('f',)})\n")
    (package / "stage" / "a.py").write_text("from .b import g\n\ndef f():\n    return g()\n")
    (package / "stage" / "b.py").write_text("def g():\n    from .a import f\n    return f\n")
    shape = MEASURE(package)
    assert shape.cycles == [["peft_restorelcc.stage.a", "peft_restorelcc.stage.b"]]
    assert shape.function_imports == ["peft_restorelcc.stage.b:2 -> peft_restorelcc.stage.a"]
    assert shape.top_entries == ["stage"]
