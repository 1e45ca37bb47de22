"""The shape of the code itself: small functions (issue 13), kept so by a test."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "pyroflows"
MAX_LINES = 80  # of code, the docstring not counted


def _long_functions():
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            lines = node.end_lineno - node.lineno + 1
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(
                    first.value.value, str):
                lines -= first.end_lineno - first.lineno + 1
            if lines > MAX_LINES:
                yield f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} ({lines} lines)"


def test_no_function_longer_than_80_lines():
    assert list(_long_functions()) == []
