"""The package's shape: rooms at the root, layers that point one way, no import cycles,
algorithms free of Ray.

The import graph is read statically (``ast``) from every module of ``cafe_ray``. An edge
A -> B means that A imports B somewhere: at module level, or lazily inside a function
(``if TYPE_CHECKING`` blocks too, with ``lazy=True``). The import-time graph
(``lazy=False``) holds only what importing A runs.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import cafe_ray

PKG_DIR = Path(cafe_ray.__file__).parent
ROOT_MODULES_ALLOWED = {"__init__.py", "cli.py", "config.py"}

# The rooms of cafe_ray from the ground up: a room imports only rooms on lower floors (lazy
# imports inside functions count too); rooms on one floor do not import each other. "cafe_ray"
# is the package's own __init__.py. docs/architecture.md draws the same floors.
ROOM_ORDER: tuple[tuple[str, ...], ...] = (
    ("cafe_ray", "config"),
    ("data",),
    ("models",),
    ("algorithms",),
    ("runs",),
    ("sim", "inference"),
    ("envs", "serve", "studies", "cluster", "api"),
    ("bench",),
    ("commands",),
    ("cli",),
)


def module_name(path: Path, pkg_dir: Path) -> str:
    rel = path.relative_to(pkg_dir.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_modules(pkg_dir: Path) -> dict[str, Path]:
    """Every module of the package rooted at ``pkg_dir``, by dotted name."""
    return {module_name(p, pkg_dir): p for p in sorted(pkg_dir.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _all_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom)]


def _module_level_imports(body: list[ast.stmt]) -> list[ast.Import | ast.ImportFrom]:
    """Import statements run when the module is imported (not in functions/classes' methods)."""
    found: list[ast.Import | ast.ImportFrom] = []
    for node in body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        elif isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                found += _module_level_imports(node.body)
            found += _module_level_imports(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody, *[h.body for h in node.handlers]):
                found += _module_level_imports(block)
        elif isinstance(node, ast.With | ast.ClassDef):
            found += _module_level_imports(node.body)
    return found


def _resolve(node: ast.ImportFrom, current: str, is_pkg: bool) -> str:
    if node.level == 0:
        return node.module or ""
    base = current.split(".") if is_pkg else current.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imported_names(node: ast.Import | ast.ImportFrom, current: str, is_pkg: bool) -> list[str]:
    """Dotted module names an import statement may load (``from m import x``: m.x, else m)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = _resolve(node, current, is_pkg)
    return [base] + [f"{base}.{a.name}" for a in node.names]


def import_graph(pkg_dir: Path, lazy: bool = False) -> dict[str, set[str]]:
    """Import edges between the package's own modules: module-level ones, or every import
    anywhere in the file with ``lazy=True``."""
    modules = package_modules(pkg_dir)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        is_pkg = path.name == "__init__.py"
        # A module's ancestor packages are always being imported before it: no new edge.
        ancestors = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
        for node in _all_imports(tree) if lazy else _module_level_imports(tree.body):
            for target in imported_names(node, name, is_pkg):
                parts = target.split(".")
                # importing a.b.c runs a, a.b and a.b.c (`from m import x`: x only if a module)
                for prefix in (".".join(parts[:i]) for i in range(1, len(parts) + 1)):
                    if prefix in modules and prefix != name and prefix not in ancestors:
                        graph[name].add(prefix)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path [a, b, ..., a], or None when the graph is acyclic."""
    white, grey, black = 0, 1, 2
    color = dict.fromkeys(graph, white)
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        color[node] = grey
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if color.get(nxt, black) == grey:
                return stack[stack.index(nxt):] + [nxt]
            if color.get(nxt) == white and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        color[node] = black
        return None

    for node in sorted(graph):
        if color[node] == white and (cycle := visit(node)):
            return cycle
    return None


def room_of(module: str) -> str:
    """cafe_ray.sim.engine -> sim; cafe_ray.cli -> cli; cafe_ray -> cafe_ray."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def floor_of(room: str) -> int:
    for i, rooms in enumerate(ROOM_ORDER):
        if room in rooms:
            return i
    raise KeyError(room)


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """'a -> b' for every edge from a room to one on its own floor or above."""
    return sorted(f"{a} -> {b}" for a, targets in graph.items() for b in targets
                  if room_of(a) != room_of(b) and floor_of(room_of(b)) >= floor_of(room_of(a)))


def all_imports(path: Path) -> list[tuple[int, str]]:
    """Every import anywhere in a file (functions included), as (line, dotted name)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module))
    return out


# ----------------------------------------------------------------------------- tests
def test_only_cli_and_config_at_the_package_root() -> None:
    loose = sorted(p.name for p in PKG_DIR.glob("*.py") if p.name not in ROOT_MODULES_ALLOWED)
    assert not loose, (
        f"loose modules at cafe_ray/ root: {loose}; put each in the package named for what "
        "users do with it (see docs/architecture.md)"
    )


def test_every_package_directory_is_a_package() -> None:
    missing = sorted(
        str(d.relative_to(PKG_DIR)) for d in PKG_DIR.rglob("*")
        if d.is_dir() and d.name != "__pycache__" and any(d.glob("*.py"))
        and not (d / "__init__.py").exists()
    )
    assert not missing, f"directories with modules but no __init__.py: {missing}"


def test_no_import_cycles_among_cafe_ray_modules() -> None:
    """Neither at import time nor through imports inside functions."""
    for lazy in (False, True):
        graph = import_graph(PKG_DIR, lazy=lazy)
        assert len(graph) > 50 and "cafe_ray.sim.simulation" in graph
        assert "cafe_ray.algorithms.base" in graph["cafe_ray.algorithms.fedavg"]  # edges are found
        cycle = find_cycle(graph)
        assert cycle is None, f"import cycle ({'lazy imports included' if lazy else 'import time'}): " + " -> ".join(
            cycle or [])


def test_every_room_has_a_floor() -> None:
    rooms = {room_of(m) for m in package_modules(PKG_DIR)}
    placed = [r for floor in ROOM_ORDER for r in floor]
    assert len(placed) == len(set(placed)), "a room is on two floors of ROOM_ORDER"
    assert rooms == set(placed), (f"rooms without a floor: {sorted(rooms - set(placed))}; "
                                  f"floors without a room: {sorted(set(placed) - rooms)}")


def test_layers_point_one_way() -> None:
    """No room imports a room on its floor or above, lazily inside a function either."""
    graph = import_graph(PKG_DIR, lazy=True)
    assert "cafe_ray.models.zoo" in graph["cafe_ray.sim.runner"] or "cafe_ray.models" in graph["cafe_ray.sim.runner"]
    bad = upward_imports(graph)
    assert not bad, "imports against the room order (tests/test_layout.py ROOM_ORDER): " + "; ".join(bad)


def test_the_run_directory_imports_nothing_from_the_ray_layer() -> None:
    graph = import_graph(PKG_DIR, lazy=True)
    bad = sorted(f"{a} -> {b}" for a, targets in graph.items() if room_of(a) == "runs"
                 for b in targets if room_of(b) == "sim")
    assert not bad, "cafe_ray/runs must not import cafe_ray/sim: " + "; ".join(bad)


def test_upward_imports_are_found_lazy_ones_included(tmp_path: Path) -> None:
    pkg = _write_pkg(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/config.py": "",
        "pkg/data/__init__.py": "",
        "pkg/data/base.py": "from pkg import config\n",
        "pkg/sim/__init__.py": "",
        "pkg/sim/engine.py": "from pkg.data import base\n",
        "pkg/runs/__init__.py": "",
        "pkg/runs/rundir.py": "def f():\n    from pkg.sim.engine import x\n",
    })
    assert upward_imports(import_graph(pkg)) == []  # the lazy import is no import-time edge
    assert upward_imports(import_graph(pkg, lazy=True)) == ["pkg.runs.rundir -> pkg.sim", "pkg.runs.rundir -> pkg.sim.engine"]


def _write_pkg(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root / "pkg"


def test_cycle_finder_catches_a_cycle_and_ignores_lazy_and_type_checking_imports(tmp_path: Path) -> None:
    pkg = _write_pkg(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from pkg.b import thing\n",
        "pkg/b.py": """
            from typing import TYPE_CHECKING
            if TYPE_CHECKING:
                from pkg import a
            def f():
                from pkg.a import x
            thing = 1
        """,
        "pkg/sub/__init__.py": "from . import c\n",
        "pkg/sub/c.py": "from .. import a\n",
    })
    graph = import_graph(pkg)
    assert graph["pkg.a"] == {"pkg.b"}
    assert graph["pkg.b"] == set()  # TYPE_CHECKING and function-level imports are not edges
    assert graph["pkg.sub"] == {"pkg.sub.c"} and graph["pkg.sub.c"] == {"pkg.a"}
    assert find_cycle(graph) is None

    (pkg / "b.py").write_text("import pkg.sub.c\nthing = 1\n")
    cycle = find_cycle(import_graph(pkg))
    assert cycle is not None and cycle[0] == cycle[-1]
    assert {"pkg.a", "pkg.b", "pkg.sub.c"} <= set(cycle)


def test_algorithms_never_import_ray_in_their_source() -> None:
    algo_dir = PKG_DIR / "algorithms"
    files = sorted(algo_dir.rglob("*.py"))
    assert len(files) > 10
    offenders = [
        f"{p.relative_to(PKG_DIR.parent)}:{line}: {name}"
        for p in files for line, name in all_imports(p)
        if name == "ray" or name.startswith("ray.")
    ]
    assert not offenders, "cafe_ray/algorithms must stay Ray-free: " + "; ".join(offenders)


def test_algorithms_pull_in_no_ray_when_imported() -> None:
    """Transitively too: importing every algorithm module leaves ``ray`` out of sys.modules."""
    modules = sorted(m for m in package_modules(PKG_DIR) if m.startswith("cafe_ray.algorithms"))
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}:\n"
        "    importlib.import_module(m)\n"
        "bad = sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.'))\n"
        "print('RAY_MODULES', bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("room", ["studies", "runs", "envs", "commands", "sim", "algorithms"])
def test_rooms_exist_with_their_documented_modules(room: str) -> None:
    expected = {
        "studies": {"compare.py", "sweep.py", "centralized.py"},
        "runs": {"rundir.py", "artifacts.py"},
        "envs": {"early_exit.py", "training.py"},
        "commands": {"reference.py"},
        "sim": {"simulation.py", "executor.py", "profiles.py"},
        "algorithms": {"base.py"},
    }[room]
    present = {p.name for p in (PKG_DIR / room).glob("*.py")}
    assert expected <= present, f"cafe_ray/{room}/ lacks {sorted(expected - present)}"
