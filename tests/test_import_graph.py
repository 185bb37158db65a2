"""The package's shape (DESIGN.md §2): no import cycle, no stage importing another stage (pipeline.py orders
them), no module over 400 lines, and every module opens with one line saying what it holds."""
from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

PKG = REPO / "coopt_ray"
STAGES = {"optimize", "merge", "train", "evaluate", "report", "zoo", "distill", "rounds"}
TOP = {"pipeline", "cli", "baselines", "__main__"}  # may import stages
MAX_LINES = 400


def modules(pkg: Path) -> list[tuple[str, Path]]:
    """``(module, file)`` for every file of pkg; a subpackage's files (distill/*.py) count as one module, the
    subpackage."""
    out = []
    for f in sorted(pkg.rglob("*.py")):
        rel = f.relative_to(pkg)
        out.append((rel.parts[0] if len(rel.parts) > 1 else f.stem, f))
    return out


def import_graph(pkg: Path) -> dict[str, set[str]]:
    """``{module: modules of pkg it imports}`` from every import statement (module level or in functions)."""
    mods = {m for m, _ in modules(pkg)}
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, f in modules(pkg):
        nested = f.parent != pkg
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            names: list[str] = []
            if isinstance(node, ast.ImportFrom):
                if node.level == 1 and nested:
                    names = [mod]  # a sibling inside the subpackage: the module itself
                elif node.level == (2 if nested else 1):
                    names = [node.module] if node.module else [a.name for a in node.names]
                elif node.module and node.module.startswith(pkg.name + "."):
                    names = [node.module.split(".")[1]]
                elif node.module == pkg.name:
                    names = [a.name for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name.split(".")[1] for a in node.names if a.name.startswith(pkg.name + ".")]
            graph[mod] |= {n.split(".")[0] for n in names if n and n.split(".")[0] in mods} - {mod}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import cycle, as the modules on it (depth-first search; each cycle reported once)."""
    found, seen = [], set()

    def visit(m: str, path: list[str]) -> None:
        for t in sorted(graph[m]):
            if t in path:
                cyc = path[path.index(t):]
                if frozenset(cyc) not in seen:
                    seen.add(frozenset(cyc))
                    found.append(cyc)
            else:
                visit(t, path + [t])

    for m in sorted(graph):
        visit(m, [m])
    return found


def stage_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} -> {t}" for m, ts in graph.items() for t in ts if m in STAGES and t in STAGES)


def test_the_checker_finds_a_planted_cycle_and_a_stage_import(tmp_path):
    pkg = tmp_path / "coopt_ray"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import x\n")
    (pkg / "b.py").write_text("def f():\n    from coopt_ray.a import y\n")
    (pkg / "train.py").write_text("import coopt_ray.evaluate\n")
    (pkg / "evaluate.py").write_text("from . import a\n")
    (pkg / "distill").mkdir()
    (pkg / "distill" / "__init__.py").write_text("")
    (pkg / "distill" / "stage.py").write_text("from .krr import f\nfrom ..evaluate import g\n")
    (pkg / "distill" / "krr.py").write_text("from ..a import x\n")
    g = import_graph(pkg)
    assert g["a"] == {"b"} and g["b"] == {"a"} and g["train"] == {"evaluate"} and g["evaluate"] == {"a"}
    assert g["distill"] == {"evaluate", "a"}
    assert cycles(g) == [["a", "b"]]
    assert stage_imports(g) == ["distill -> evaluate", "train -> evaluate"]


def test_no_cycles_and_no_stage_imports_another_stage():
    g = import_graph(PKG)
    assert g["pipeline"] >= {"optimize", "merge", "train", "evaluate", "report", "distill"}  # the graph is really read
    assert g["distill"] >= {"student", "convnet", "rows"}  # the subpackage's files are read too
    assert cycles(g) == []
    assert stage_imports(g) == []
    lower = {m for m in g if m not in STAGES | TOP}
    assert sorted(f"{m} -> {t}" for m in lower for t in g[m] if t in STAGES | TOP) == []  # imports only go down


def test_modules_are_small_and_say_what_they_hold():
    for _, f in modules(PKG):
        lines = f.read_text().splitlines()
        assert len(lines) <= MAX_LINES, f"{f.name}: {len(lines)} lines"
        if f.name != "__init__.py":
            doc = ast.get_docstring(ast.parse(f.read_text()))
            assert doc and doc.splitlines()[0].strip(), f"{f.name} has no opening line saying what it holds"
