"""Layering and size rules of the three packages, read from the source with ``ast``.

* ``spaces`` imports neither ``evaluators`` nor ``search`` (nor Ray or Optuna: it is plain
  description and cost); ``evaluators`` imports neither ``search`` nor ``optuna`` — at module
  level, inside functions and in ``TYPE_CHECKING`` blocks alike (an import inside a function
  is still a dependency).
* No module over 450 lines, no function over 60 lines, except the entries named in the
  "Allowed exceptions" section of docs/ARCHITECTURE.md (a file path, or
  ``module.function``).
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("spaces", "evaluators", "search")
FORBIDDEN = {"spaces": ("evaluators", "search", "optuna", "ray"), "evaluators": ("search", "optuna")}
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 450, 60
EXCEPTIONS_HEADING = "## Allowed exceptions"


def package_files(root: Path = ROOT) -> Iterator[tuple[str, Path]]:
    """(package, file) for every .py file under the packages."""
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            if "__pycache__" not in path.parts:
                yield package, path


def imported_modules(tree: ast.AST, module_package: tuple[str, ...]) -> Iterator[tuple[str, int]]:
    """(absolute module name, line) of every import anywhere in ``tree``: statements at any
    depth (functions, ``if TYPE_CHECKING:``) and ``importlib.import_module("...")`` /
    ``__import__("...")`` calls with a constant name. ``module_package``: the package the
    module lives in, to resolve relative imports."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = module_package[: len(module_package) - (node.level - 1)] if node.level else ()
            if node.module:
                yield ".".join([*base, node.module]), node.lineno
            else:  # "from . import x": the names are modules of the package
                for alias in node.names:
                    yield ".".join([*base, alias.name]), node.lineno
        elif isinstance(node, ast.Call) and _is_dynamic_import(node.func) and node.args:
            first = node.args[0]
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                yield first.value, node.lineno


def _is_dynamic_import(func: ast.expr) -> bool:
    if isinstance(func, ast.Attribute):
        return func.attr == "import_module"
    return isinstance(func, ast.Name) and func.id in ("import_module", "__import__")


def layering_leaks(package: str, path: Path, source: str, root: Path = ROOT) -> list[str]:
    """``file:line: package imports module`` for every forbidden import in ``source``."""
    forbidden = FORBIDDEN.get(package, ())
    module_package = path.relative_to(root).parent.parts
    where = path.relative_to(root)
    return [
        f"{where}:{line}: {package} imports {name}"
        for name, line in imported_modules(ast.parse(source), module_package)
        if name.split(".")[0] in forbidden
    ]


def allowed_exceptions(architecture: Path = ROOT / "docs" / "ARCHITECTURE.md") -> str:
    """The text of the "Allowed exceptions" section (up to the next ``## `` heading), or ""."""
    if not architecture.is_file():
        return ""
    text = architecture.read_text()
    start = text.find(EXCEPTIONS_HEADING)
    if start < 0:
        return ""
    rest = text[start + len(EXCEPTIONS_HEADING):]
    end = re.search(r"^## ", rest, flags=re.MULTILINE)
    return rest[: end.start()] if end else rest


def size_violations(path: Path, source: str, allowed: str, root: Path = ROOT) -> list[str]:
    """Modules over 450 lines and functions over 60 lines not named in ``allowed``."""
    where = path.relative_to(root)
    found = []
    lines = len(source.splitlines())
    if lines > MAX_MODULE_LINES and str(where) not in allowed:
        found.append(f"{where}: {lines} lines > {MAX_MODULE_LINES}")
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            if length > MAX_FUNCTION_LINES and f"{path.stem}.{node.name}" not in allowed:
                found.append(f"{where}:{node.lineno}: {node.name} is {length} lines > {MAX_FUNCTION_LINES}")
    return found


# -- the rules on this repository ---------------------------------------------------------------
def test_packages_import_only_downwards():
    leaks = [leak for package, path in package_files() for leak in layering_leaks(package, path, path.read_text())]
    assert not leaks, "layering leaks:\n" + "\n".join(leaks)


def test_modules_and_functions_are_small():
    allowed = allowed_exceptions()
    too_big = [v for _, path in package_files() for v in size_violations(path, path.read_text(), allowed)]
    assert not too_big, "over the size limits (or list them under 'Allowed exceptions' in docs/ARCHITECTURE.md):\n" + \
        "\n".join(too_big)


# -- the checkers themselves --------------------------------------------------------------------
LEAKY = '''\
from __future__ import annotations
import importlib
from typing import TYPE_CHECKING

import torch
from spaces.policy import Policy

if TYPE_CHECKING:
    from search.base import Searcher

def build():
    import optuna.samplers
    from ..search import runner
    return importlib.import_module("search.cli")
'''


@pytest.mark.parametrize("package, leaks", [
    ("spaces", ["spaces/x.py:9: spaces imports search.base", "spaces/x.py:12: spaces imports optuna.samplers",
                "spaces/x.py:13: spaces imports search", "spaces/x.py:14: spaces imports search.cli"]),
    ("evaluators", ["evaluators/x.py:9: evaluators imports search.base",
                    "evaluators/x.py:12: evaluators imports optuna.samplers",
                    "evaluators/x.py:13: evaluators imports search", "evaluators/x.py:14: evaluators imports search.cli"]),
    ("search", []),
])
def test_leaks_are_found_at_any_depth_with_their_line(tmp_path, package, leaks):
    path = tmp_path / package / "x.py"
    assert sorted(layering_leaks(package, path, LEAKY, root=tmp_path)) == sorted(leaks)


def test_relative_imports_resolve_against_the_package(tmp_path):
    source = "from . import policy\nfrom .. import search\nfrom ..evaluators.prune import apply_policy\n"
    found = layering_leaks("spaces", tmp_path / "spaces" / "x.py", source, root=tmp_path)
    assert found == ["spaces/x.py:2: spaces imports search", "spaces/x.py:3: spaces imports evaluators.prune"]


def test_sizes_respect_the_allowed_exceptions(tmp_path):
    path = tmp_path / "search" / "big.py"
    long_function = "def long():\n" + "    x = 1\n" * 61
    source = long_function + "\n" * (MAX_MODULE_LINES - 62 + 1)
    assert size_violations(path, source, "", root=tmp_path) == [
        f"search/big.py: {MAX_MODULE_LINES + 1} lines > {MAX_MODULE_LINES}",
        "search/big.py:1: long is 62 lines > 60",
    ]
    assert size_violations(path, source, "- search/big.py: why\n- `big.long`: why", root=tmp_path) == []


def test_exceptions_are_read_from_their_section_only(tmp_path):
    doc = tmp_path / "ARCHITECTURE.md"
    doc.write_text("# A\nsearch/runner.py is the driver\n## Allowed exceptions\n- `masking_core.learn_ratios`: one loop\n"
                   "## Next\nsearch/other.py\n")
    section = allowed_exceptions(doc)
    assert "masking_core.learn_ratios" in section
    assert "search/runner.py" not in section and "search/other.py" not in section
    assert allowed_exceptions(tmp_path / "missing.md") == ""
