"""The package's layout: one home for the argument checks and for the time grids, and no import
cycle between the unconditional samplers and the multistep solvers (issue: cycles and copies).
Read from the source with ``ast``: what is imported from where, and what is defined where."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "hierprior"
CHECKS = {"check_int", "check_float", "check_optional_int", "check_choice", "check_positive"}


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path, ast.parse(path.read_text(), filename=str(path))


def _imports(tree) -> list[tuple[str, str]]:
    """(module, name) of every ``from module import name`` in a tree (nested ones included)."""
    return [
        (node.module or "", alias.name)
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
    ]


def test_argument_checks_have_one_home():
    for path, tree in _modules():
        rel = path.relative_to(PACKAGE.parent)
        for module, name in _imports(tree):
            if name in CHECKS:
                assert module == "hierprior.checks", f"{rel} imports {name} from {module}"
        if path.name != "checks.py":
            defined = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
            assert not defined & CHECKS, f"{rel} defines {sorted(defined & CHECKS)} again"


def test_time_grids_have_one_home():
    names = {"SPACINGS", "_coeffs"}
    for path, tree in _modules():
        rel = path.relative_to(PACKAGE.parent)
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.Assign):
                targets = [t.id for t in node.targets if isinstance(t, ast.Name)]
            elif isinstance(node, ast.FunctionDef):
                targets = [node.name]
            for name in set(targets) & names:
                assert (
                    rel.as_posix() == "hierprior/diffusion/schedule.py" and name == "SPACINGS"
                ), f"{rel} defines {name}"


def test_the_solvers_do_not_import_the_samplers():
    tree = ast.parse((PACKAGE / "diffusion" / "solvers.py").read_text())
    modules = {m for m, _ in _imports(tree)}
    modules |= {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    assert "hierprior.diffusion.sampling" not in modules
