"""Code a reader can hold, outside the tests and the lab: no module over 600 lines, no
function of cyclomatic complexity over 20, no class without a docstring that says its job.
Complexity as radon and mccabe count it: 1, plus one for each if, elif, conditional
expression, loop, except clause, assert, match case, comprehension (and each of its
conditions), and each extra operand of and / or."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MAX_LINES = 600
MAX_COMPLEXITY = 20
BRANCHES = (ast.If, ast.IfExp, ast.For, ast.AsyncFor, ast.While, ast.ExceptHandler,
            ast.Assert, ast.match_case)


def sources() -> list[Path]:
    return sorted(p for package in ("tcpcopyd", "interceptd", "shm")
                  for p in (ROOT / package).rglob("*.py")
                  if "lab" not in p.relative_to(ROOT).parts)


def complexity(fn: ast.AST) -> int:
    """Of ``fn`` and what it nests (as radon counts a function with its inner ones)."""
    n = 1
    for node in ast.walk(fn):
        if isinstance(node, BRANCHES):
            n += 1
        elif isinstance(node, ast.comprehension):
            n += 1 + len(node.ifs)
        elif isinstance(node, ast.BoolOp):
            n += len(node.values) - 1
    return n


def test_the_complexity_count_is_radons():
    fn = ast.parse("def f(a, b):\n"
                   "    if a and b:\n"
                   "        return [x for x in a if x]\n"
                   "    for y in b:\n"
                   "        pass\n"
                   "    return 1 if a else 2\n").body[0]
    assert complexity(fn) == 7      # 1 + if + and + comprehension + its if + for + ifexp


def test_no_module_is_over_600_lines():
    long = {str(p.relative_to(ROOT)): n for p in sources()
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these modules (lines): {long}"


def test_no_function_is_over_complexity_20():
    over = []
    for p in sources():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) \
                    and (c := complexity(node)) > MAX_COMPLEXITY:
                over.append(f"{p.relative_to(ROOT)}:{node.lineno} {node.name} ({c})")
    assert not over, "split these functions: " + ", ".join(over)


def test_every_class_says_its_one_job():
    bare = [f"{p.relative_to(ROOT)}:{node.lineno} {node.name}" for p in sources()
            for node in ast.walk(ast.parse(p.read_text()))
            if isinstance(node, ast.ClassDef) and not ast.get_docstring(node)]
    assert not bare, "give these classes a docstring: " + ", ".join(bare)
