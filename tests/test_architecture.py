"""The shape of the house: imports point one way along the data's journey, no import circles, small files.

Layers, lowest first (a module may import its own layer and the ones below, never one above):

    core        errors, files, labels, config, flags, _runtime, distributed, _version (used by every stage)
    data        files on disk -> arrays and Samples
    models      nn.Modules, knowing nothing of files
    runfolder   the contract between training and inference: checkpoints, model.json, load_run
    inference   a run folder + images -> probabilities, masks, labels, tables
    evaluation  predictions + truth -> scores
    training    data + models -> a run folder; validates with inference and chooses checkpoints by evaluation
    front       cli, demo, the napari reader, the package's public API (__init__)

Every import is counted, also those inside functions: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "unetlab"
LAYERS = [
    {"errors", "files", "labels", "config", "flags", "_runtime", "distributed", "_version"},
    {"data"},
    {"models"},
    {"runfolder"},
    {"inference"},
    {"evaluation"},
    {"training"},
    {"cli", "cli_commands", "demo", "napari_reader", "__init__", "__main__"},
]
MAX_LINES = 500


def _modules() -> dict[str, Path]:
    mods = {}
    for p in SRC.rglob("*.py"):
        parts = list(p.relative_to(SRC).with_suffix("").parts)
        mods[".".join(parts)] = p
    return mods


def _imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the unetlab modules it imports (``a.b.__init__`` for packages), found with ast."""
    names = {m[: -len(".__init__")] if m.endswith(".__init__") else m: m for m in mods}
    names["__init__"] = "__init__"
    graph: dict[str, set[str]] = {}
    for mod, path in mods.items():
        package = mod.split(".")[:-1]
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package[: len(package) - node.level + 1]
                    stem = ".".join(base + ([node.module] if node.module else []))
                elif node.module and node.module.split(".")[0] == "unetlab":
                    stem = node.module.partition(".")[2]
                else:
                    continue
                for alias in node.names:
                    full = f"{stem}.{alias.name}" if stem else alias.name
                    targets.append(full if full in names else (stem or "__init__"))
            elif isinstance(node, ast.Import):
                targets = [a.name.partition(".")[2] or "__init__" for a in node.names
                           if a.name.split(".")[0] == "unetlab"]
            for t in targets:
                if t in names and names[t] != mod:
                    found.add(names[t])
        graph[mod] = found
    return graph


def _layer(mod: str) -> int:
    top = mod.split(".")[0]
    for i, layer in enumerate(LAYERS):
        if top in layer:
            return i
    raise AssertionError(f"module {mod} is in no layer of tests/test_architecture.py: place it")


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` as a path, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_cycle_finder_finds_a_circle_and_accepts_a_tree():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_import_finder_sees_relative_absolute_and_lazy_imports(tmp_path, monkeypatch):
    pkg = tmp_path / "unetlab"
    (pkg / "data").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "errors.py").write_text("")
    (pkg / "data" / "__init__.py").write_text("")
    (pkg / "data" / "io.py").write_text("from ..errors import X\ndef f():\n    from unetlab.data import sample\n")
    (pkg / "data" / "sample.py").write_text("import unetlab.errors\n")
    monkeypatch.setattr(__import__(__name__), "SRC", pkg)
    graph = _imports(_modules())
    assert graph["data.io"] == {"errors", "data.sample"}
    assert graph["data.sample"] == {"errors"}


def test_no_import_circle_between_files():
    cycle = _cycle(_imports(_modules()))
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_no_import_circle_between_packages():
    packages: dict[str, set[str]] = {}
    for mod, deps in _imports(_modules()).items():
        top = mod.split(".")[0]
        packages.setdefault(top, set()).update(d.split(".")[0] for d in deps if d.split(".")[0] != top)
    cycle = _cycle(packages)
    assert cycle is None, "package circle: " + " -> ".join(cycle)


def test_imports_point_down_the_journey():
    upward = [f"{m} -> {d}" for m, deps in _imports(_modules()).items() for d in sorted(deps)
              if _layer(d) > _layer(m)]
    assert not upward, "imports pointing up the layers:\n" + "\n".join(upward)


@pytest.mark.parametrize("path", sorted(SRC.rglob("*.py")), ids=lambda p: str(p.relative_to(SRC)))
def test_no_source_file_over_500_lines(path):
    n = len(path.read_text().splitlines())
    assert n <= MAX_LINES, f"{path.relative_to(SRC)} has {n} lines: split it by responsibility"
