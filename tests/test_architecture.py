"""Architecture checks: every module of tpops imports, and no import cycle exists in src/.

The graph counts every import statement in a module: top level, under
``if TYPE_CHECKING:`` and inside functions (a late import hides a cycle, it does not
break it). ``from package import name`` is an edge to ``package.name`` when that is a
module, else to ``package``. The second test proves the check can fail.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import tpops

SRC = Path(tpops.__file__).resolve().parent


def modules_of(root: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` below ``root`` (``__init__`` = the package)."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """Module -> the modules of the same package it imports anywhere in its source."""
    modules = modules_of(root, package)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = name.split(".")
                    anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                    base = ".".join([*anchor, base] if base else anchor)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in targets:
                while target and target not in modules:  # "import tpops.x.y" names tpops.x.y
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path that ends where it starts, or None (depth-first search)."""
    done: set[str] = set()
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        if node in path:
            return path[path.index(node):] + [node]
        if node in done:
            return None
        path.append(node)
        for nxt in sorted(graph[node]):
            cycle = visit(nxt)
            if cycle:
                return cycle
        path.pop()
        done.add(node)
        return None

    for start in sorted(graph):
        cycle = visit(start)
        if cycle:
            return cycle
    return None


def test_every_module_imports() -> None:
    names = sorted(modules_of(SRC, "tpops"))
    assert {"tpops.session", "tpops.commands", "tpops.reply", "tpops.authorization", "tpops.transaction"} <= set(names)
    for name in names:  # scripts/test installs the mysql and metrics extras: everything imports
        importlib.import_module(name)


def test_no_import_cycle_in_src() -> None:
    assert find_cycle(import_graph(SRC, "tpops")) is None


@pytest.mark.parametrize(
    "a_source",
    [
        "from pkg import b\n",
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.b import B\n",
        "def late():\n    from . import b\n",
        "import pkg.b\n",
    ],
    ids=["top-level", "type-checking", "late-relative", "import-dotted"],
)
def test_cycle_check_finds_a_deliberate_cycle(tmp_path: Path, a_source: str) -> None:
    root = tmp_path / "pkg"
    (root / "sub").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "a.py").write_text(a_source)
    (root / "b.py").write_text("from pkg.sub import c\n")
    (root / "sub" / "__init__.py").write_text("")
    (root / "sub" / "c.py").write_text("from ..a import late\n")
    graph = import_graph(root, "pkg")
    assert graph["pkg.b"] == {"pkg.sub.c"}
    assert find_cycle(graph) == ["pkg.a", "pkg.b", "pkg.sub.c", "pkg.a"]
    (root / "sub" / "c.py").write_text("")  # the same package without the back edge
    assert find_cycle(import_graph(root, "pkg")) is None
