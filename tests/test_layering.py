"""The package imports downward only (DESIGN.md, Layering), and no two modules import each other,
directly or around a loop, whether the import is at the top of a file or inside a function."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "gpt2cube"

# component (top-level module or subpackage) -> floor; a module may import its own floor and below
LAYERS = {
    "__init__": 0, "constants": 0, "errors": 0, "atomic": 0, "kernels": 0, "gguf_file": 0,
    "tokenizers": 1, "variants": 1,
    "converter": 2,
    "models": 3,
    "hypercube": 4, "engine": 4,
    "eval": 5, "inspect_gguf": 5, "loop": 5, "calib": 5,
    "train": 6,
    "finetune": 7, "prune": 7, "synth": 7, "chat": 7,
    "pipeline": 8, "demo": 8,
    "cli": 9, "__main__": 9,
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """gpt2cube modules imported anywhere in the file, resolved to dotted names."""
    pkg = _module_name(path) if path.name == "__init__.py" else _module_name(path).rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("gpt2cube"):
                # `from .x import y` may import the submodule y
                for a in node.names:
                    sub = f"{target}.{a.name}"
                    out.add(sub if (PKG.parent / sub.replace(".", "/")).with_suffix(".py").exists()
                            or (PKG.parent / sub.replace(".", "/")).is_dir() else target)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("gpt2cube")}
    return out


def _graph() -> dict[str, set[str]]:
    return {_module_name(f): _imports(f) for f in sorted(PKG.rglob("*.py"))}


def _component(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_component_has_a_floor():
    comps = {_component(m) for m in _graph()}
    assert comps <= set(LAYERS), comps - set(LAYERS)


def test_imports_go_downward_only():
    bad = []
    for mod, targets in _graph().items():
        for t in targets:
            if LAYERS[_component(t)] > LAYERS[_component(mod)]:
                bad.append(f"{mod} -> {t}")
    assert bad == []


def test_no_import_cycles():
    graph = _graph()
    # a package's __init__ re-exporting its modules is not a loop through them
    edges = {m: {t for t in ts if t != m and not (m.startswith(t + ".") and _is_pkg(t))} for m, ts in graph.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for t in edges.get(m, ()):
            if state.get(t) == 1:
                cycles.append(" -> ".join(stack[stack.index(t):] + [t]))
            elif t in edges and not state.get(t):
                visit(t, stack + [t])
        state[m] = 2

    for m in edges:
        if not state.get(m):
            visit(m, [m])
    assert cycles == []


def _is_pkg(module: str) -> bool:
    return (PKG.parent / module.replace(".", "/")).is_dir()


def test_the_checks_see_a_violation(tmp_path):
    """The walk itself resolves relative imports (so the checks above can fail)."""
    assert "gpt2cube.eval.perplexity" in _imports(PKG / "eval" / "report.py")
    assert "gpt2cube.hypercube.metadata" in _imports(PKG / "inspect_gguf.py")
    assert LAYERS[_component("gpt2cube.eval.report")] > LAYERS[_component("gpt2cube.converter.convert")]
