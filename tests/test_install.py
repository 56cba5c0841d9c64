"""The install is the truth: every third-party module that the package, its tests, benchmarks
and scripts import is declared in pyproject.toml, so a fresh environment has it."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# modules the tree imports that belong to it, not to a distribution
LOCAL = {"gpt2cube", "tests", "_common", "conftest"}


def _canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared() -> tuple[set[str], set[str]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = {_canon(re.split(r"[<>=!~\[; ]", d)[0]) for d in project["dependencies"]}
    extras = {_canon(re.split(r"[<>=!~\[; ]", d)[0]) for deps in project.get("optional-dependencies", {}).values()
              for d in deps}
    return runtime, runtime | extras


def _imports(folder: str) -> dict[str, str]:
    """top-level module -> a file importing it, for absolute imports under ROOT/folder."""
    found: dict[str, str] = {}
    for f in sorted((ROOT / folder).rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for n in names:
                top = n.split(".")[0]
                sibling = (f.parent / f"{top}.py").is_file()  # a script beside it (benchmarks/recovery.py)
                if top not in sys.stdlib_module_names and top not in LOCAL and not sibling:
                    found.setdefault(top, str(f.relative_to(ROOT)))
    return found


def _undeclared(imports: dict[str, str], declared: set[str]) -> list[str]:
    dists = packages_distributions()
    missing = []
    for top, where in sorted(imports.items()):
        owners = {_canon(d) for d in dists.get(top, [top])}
        if not owners & declared:
            missing.append(f"{top} (imported by {where}; distributions {sorted(owners)})")
    return missing


def test_the_package_declares_every_module_it_imports():
    runtime, _ = _declared()
    assert _undeclared(_imports("gpt2cube"), runtime) == []


def test_tests_benchmarks_and_scripts_need_only_declared_packages():
    _, everything = _declared()
    imports = {**_imports("scripts"), **_imports("benchmarks"), **_imports("tests")}
    assert _undeclared(imports, everything) == []


def test_the_walk_sees_an_undeclared_module(tmp_path):
    """The check itself can fail: a module no distribution provides, and one that belongs to an
    installed distribution missing from the declared set."""
    assert _undeclared({"surely_not_a_module": "x.py"}, {"numpy"})
    assert _undeclared({"numpy": "x.py"}, {"click"})
    assert not _undeclared({"numpy": "x.py"}, {"numpy"})
