"""No function or method over 60 lines without a stated reason, in every package, bench script and script.

A function's length is ``end_lineno - lineno + 1`` of its ``def`` (signature, docstring and nested functions
included; decorators not). A longer one passes only when a line of its docstring starts with the marker
``Long because`` and says why it is not split, e.g. a compiled kernel whose split would cost a call per pixel,
or a Typer command whose signature declares its options. A Typer command keeps that reason out of ``--help``
by putting it after a form feed (``\\f``), where Click stops reading the help text.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("core", "datasets", "gen", "recon", "eval", "cluster", "bench", "scripts")
MAX_LINES = 60
MARKER = "Long because"


def long_functions(source: str, filename: str = "<source>") -> list[tuple[str, int, int]]:
    """(qualified name, first line, length) of every function over MAX_LINES lines without the marker."""
    found = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    length = child.end_lineno - child.lineno + 1
                    docstring = ast.get_docstring(child) or ""
                    explained = any(line.strip().startswith(MARKER) for line in docstring.splitlines())
                    if length > MAX_LINES and not explained:
                        found.append((name, child.lineno, length))
                visit(child, f"{name}.")
            else:
                visit(child, prefix)

    visit(ast.parse(source, filename=filename), "")
    return found


def test_no_function_is_long_without_a_reason():
    offenders = [
        f"{path.relative_to(ROOT)}:{line} {name} ({length} lines)"
        for folder in FOLDERS
        for path in sorted((ROOT / folder).rglob("*.py"))
        for name, line, length in long_functions(path.read_text(), str(path))
    ]
    assert not offenders, (
        f"functions over {MAX_LINES} lines: split them into named steps, or start a docstring line with "
        f"{MARKER!r} and say why not:\n  " + "\n  ".join(offenders)
    )


def _function(name: str, body_lines: int, docstring: str = "One step.") -> str:
    body = "".join(f"    x{i} = {i}\n" for i in range(body_lines))
    return f'def {name}():\n    """{docstring}"""\n{body}'


def test_the_check_counts_lines_and_reads_the_marker():
    """61 lines fail, 60 pass, a reason passes; methods and nested functions are measured too."""
    assert long_functions(_function("at_limit", MAX_LINES - 2)) == []
    assert long_functions(_function("over", MAX_LINES - 1)) == [("over", 1, MAX_LINES + 1)]
    reason = f"One step.\n\n    {MARKER}: one compiled loop.\n    "
    assert long_functions(_function("explained", MAX_LINES + 20, reason)) == []
    nested = "class Outer:\n" + "".join(
        f"    {line}\n" for line in _function("method", MAX_LINES).splitlines()
    )
    assert long_functions(nested) == [("Outer.method", 2, MAX_LINES + 2)]
