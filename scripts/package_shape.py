"""Measure the shape of ``peft_restorelcc/`` with ``ast`` (nothing is imported or run).

Prints four figures that issue 49 asks to keep small: entries at the top of the package (``__init__`` and
``__main__`` not counted), import cycles between the package's modules (imports inside functions counted),
imports of the package's own modules inside functions outside ``cli/``, and functions over 60 lines.

    python scripts/package_shape.py [--verbose]

``tests/test_package_shape.py`` holds the package to the limits.
"""

from __future__ import annotations

import argparse
import ast
import sys
from dataclasses import dataclass, field
from pathlib import Path

PACKAGE = "peft_restorelcc"
LONG_FUNCTION = 60
LAZY_HELPER = "lazy_face"


@dataclass
class Shape:
    top_entries: list[str]
    cycles: list[list[str]]
    function_imports: list[str]  # "module:line", one per import statement, outside cli/
    long_functions: list[tuple[str, int]]  # ("module.function", lines)
    edges: dict[str, set[str]] = field(default_factory=dict)


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    # A package's __init__ is its own base; a plain module's base is its parent package.
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _targets(module: str, is_package: bool, node: ast.AST, known: set[str]) -> list[str]:
    """The package modules one import statement reaches (``from x import submodule`` counts the submodule)."""
    names: list[str] = []
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
        base = _resolve(module, is_package, node)
        for alias in node.names:
            candidate = f"{base}.{alias.name}"
            names.append(candidate if candidate in known else base)
    found = []
    for name in names:
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name.startswith(PACKAGE) and name != module:
            found.append(name)
    return found


def _lazy_targets(package: str, call: ast.Call, known: set[str]) -> list[str]:
    """The modules a ``lazy_face(__name__, {".module": (...), ...})`` table names, relative to ``package``."""
    found = []
    for argument in call.args:
        if isinstance(argument, ast.Dict):
            for key in argument.keys:
                if isinstance(key, ast.Constant) and isinstance(key.value, str):
                    dots = len(key.value) - len(key.value.lstrip("."))
                    base = package.split(".")[: len(package.split(".")) - (dots - 1)]
                    name = ".".join(base + [key.value.lstrip(".")])
                    if name in known:
                        found.append(name)
    return found


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    sys.setrecursionlimit(10000)

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in edges.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return components


def _parent_packages(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def measure(root: Path) -> Shape:
    files = sorted(root.rglob("*.py"))
    modules = {_module_name(path, root): path for path in files}
    known = set(modules)
    edges: dict[str, set[str]] = {name: set() for name in modules}
    function_imports: list[str] = []
    long_functions: list[tuple[str, int]] = []
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        is_package = path.name == "__init__.py"
        in_cli = module.startswith(f"{PACKAGE}.cli")

        def walk(node: ast.AST, in_function: bool, type_checking: bool, module=module, is_package=is_package,
                 in_cli=in_cli) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                    walk(child, in_function, True)
                    continue
                if isinstance(child, (ast.Import, ast.ImportFrom)) and not type_checking:
                    targets = _targets(module, is_package, child, known)
                    edges[module].update(targets)
                    if targets and in_function and not in_cli:
                        function_imports.append(f"{module}:{child.lineno} -> {', '.join(sorted(set(targets)))}")
                if isinstance(child, ast.Call) and getattr(child.func, "id", None) == LAZY_HELPER:
                    # A lazy package face names its modules as strings: each is an arrow all the same.
                    edges[module].update(_lazy_targets(module, child, known))
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    length = child.end_lineno - child.lineno + 1
                    if length > LONG_FUNCTION:
                        long_functions.append((f"{module}.{child.name}", length))
                    walk(child, True, type_checking)
                else:
                    walk(child, in_function, type_checking)

        walk(tree, False, False)
    # An arrow into a package's submodule is not counted as one into the package's __init__ too: a face that hands
    # on its children's names would otherwise make a cycle with each child that imports a sibling through it.
    top = sorted(
        p.name if p.is_dir() else p.stem
        for p in root.iterdir()
        if (p.is_dir() and (p / "__init__.py").exists()) or (p.suffix == ".py" and p.stem not in ("__init__", "__main__"))
    )
    return Shape(top, _cycles(edges), function_imports, sorted(long_functions, key=lambda item: -item[1]), edges)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent / PACKAGE)
    parser.add_argument("--verbose", action="store_true", help="list the entries, cycles, imports and functions")
    args = parser.parse_args(argv)
    shape = measure(args.root)
    print(f"top-level entries: {len(shape.top_entries)}")
    print(f"import cycles: {len(shape.cycles)}")
    print(f"own-package import statements inside functions outside cli/: {len(shape.function_imports)}")
    print(f"functions over {LONG_FUNCTION} lines: {len(shape.long_functions)}")
    if args.verbose:
        print("entries:", " ".join(shape.top_entries))
        for cycle in shape.cycles:
            print("cycle:", " <-> ".join(cycle))
        for line in shape.function_imports:
            print("function import:", line)
        for name, length in shape.long_functions:
            print(f"long: {name} {length}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
