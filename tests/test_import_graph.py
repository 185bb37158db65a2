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


def import_graph(pkg: Path) -> dict[str, set[str]]:
    """``{module: modules of pkg it imports}`` from every import statement (module level or in functions)."""
    mods = {f.stem for f in pkg.glob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for f in pkg.glob("*.py"):
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            names: list[str] = []
            if isinstance(node, ast.ImportFrom):
                if node.level == 1:
                    names = [node.module] if node.module else [a.name for a in node.names]
                elif node.module and node.module.startswith(pkg.name + "."):
                    names = [node.module.split(".")[1]]
                elif node.module == pkg.name:
                    names = [a.name for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name.split(".")[1] for a in node.names if a.name.startswith(pkg.name + ".")]
            graph[f.stem] |= {n.split(".")[0] for n in names if n and n.split(".")[0] in mods} - {f.stem}
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
    g = import_graph(pkg)
    assert g["a"] == {"b"} and g["b"] == {"a"} and g["train"] == {"evaluate"} and g["evaluate"] == {"a"}
    assert cycles(g) == [["a", "b"]]
    assert stage_imports(g) == ["train -> evaluate"]


def test_no_cycles_and_no_stage_imports_another_stage():
    g = import_graph(PKG)
    assert g["pipeline"] >= {"optimize", "merge", "train", "evaluate", "report"}  # the graph is really read
    assert cycles(g) == []
    assert stage_imports(g) == []
    lower = {m for m in g if m not in STAGES | TOP}
    assert sorted(f"{m} -> {t}" for m in lower for t in g[m] if t in STAGES | TOP) == []  # imports only go down


def test_modules_are_small_and_say_what_they_hold():
    for f in sorted(PKG.glob("*.py")):
        lines = f.read_text().splitlines()
        assert len(lines) <= MAX_LINES, f"{f.name}: {len(lines)} lines"
        if f.name != "__init__.py":
            doc = ast.get_docstring(ast.parse(f.read_text()))
            assert doc and doc.splitlines()[0].strip(), f"{f.name} has no opening line saying what it holds"
