"""The house rules a newcomer relies on: modules read in one sitting, functions fit on a screen.

Lengths are counted as `ruff format` lays the code out (CI checks the formatting), from a function's `def`
(or its first decorator) to its last line.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "workflow_scripts"
MODULES = sorted(PACKAGE.rglob("*.py"))
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 50


def function_lengths(source: str) -> dict[str, int]:
    """{qualified name: lines} of every function and method in `source`."""
    lengths = {}

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = min([child.lineno, *(decorator.lineno for decorator in child.decorator_list)])
                lengths[f"{prefix}{child.name}"] = child.end_lineno - first + 1
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                visit(child, f"{prefix}{child.name}.")

    visit(ast.parse(source), "")
    return lengths


def test_function_lengths_count_decorators_and_nested_functions():
    source = "@cache\ndef outer():\n    def inner():\n        return 1\n\n    return inner\n\n\nclass C:\n    def m(self):\n        pass\n"
    assert function_lengths(source) == {"outer": 6, "outer.inner": 2, "C.m": 2}


@pytest.mark.parametrize("module", MODULES, ids=lambda path: str(path.relative_to(PACKAGE)))
def test_module_reads_in_one_sitting(module):
    source = module.read_text()
    assert len(source.splitlines()) <= MAX_MODULE_LINES, f"{module}: split it by concern"
    long = {name: n for name, n in function_lengths(source).items() if n > MAX_FUNCTION_LINES}
    assert not long, f"{module}: functions over {MAX_FUNCTION_LINES} lines: {long}"
