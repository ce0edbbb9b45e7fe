"""The code's layout: no import cycle (function-level imports included), docstrings cite files,
sections and names that exist, no function longer than 80 lines."""

from __future__ import annotations

import ast
import graphlib
import importlib
import os
import re
from pathlib import Path

import pytest
from helpers import REPO

PACKAGES = ("jaxind", "converters", "launch")
ROOT = Path(REPO)


def module_files(root: Path, packages=PACKAGES) -> dict[str, Path]:
    """``{"jaxind.models.model": path, "jaxind": path of __init__.py, ...}`` for every module of ``packages``."""
    out = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def _type_checking_only(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and ast.unparse(test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")


def _import_nodes(tree: ast.AST):
    """Every Import/ImportFrom anywhere (functions included), except under ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if _type_checking_only(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def import_graph(root: Path, packages=PACKAGES) -> dict[str, set[str]]:
    """Module -> the project modules it imports, at module level or inside functions. Importing
    ``p.q.r`` also runs the ``__init__`` of ``p`` and ``p.q``: that counts as an edge to them, unless
    the importer lives inside that package (which Python has then already entered)."""
    modules = module_files(root, packages)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in _import_nodes(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = name.split(".") if is_package else name.split(".")[:-1]
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in targets:
                parts = target.split(".")
                for i in range(1, len(parts) + 1):
                    prefix = ".".join(parts[:i])
                    if prefix not in modules or prefix == name:
                        continue
                    if not name.startswith(prefix + "."):
                        graph[name].add(prefix)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as e:
        return list(e.args[1])
    return None


def test_no_import_cycle():
    graph = import_graph(ROOT)
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"
    # The graph sees function-level imports and package __init__ edges (else this test proves nothing).
    assert "converters.sources" in graph["jaxind.cli.main"]  # imported inside run()
    assert "jaxind" in graph["converters.sources"]
    # One-way: the library core never reaches the converters.
    reach, todo = set(), ["jaxind"]
    while todo:
        for dep in graph[todo.pop()] - reach:
            reach.add(dep)
            todo.append(dep)
    assert not {m for m in reach if m.startswith("converters")}, sorted(reach)


# The floors of the package, bottom up (docs/DESIGN.md §2): a module imports only from its own floor or below.
FLOORS = ("base", "models", "parallel", "io", "converters", "stats", "pair", "many", "cli", "entry")
BASE = {"jaxind._compat", "jaxind.errors", "jaxind.progress", "jaxind.testhooks", "jaxind.types"}
ENTRIES = {"jaxind.main", "jaxind.sweep", "converters.convert"}  # what ``python -m`` runs


def floor(module: str) -> str:
    """The floor of a module: its folder under ``jaxind/``, ``converters``, ``base`` or ``entry``."""
    if module in ENTRIES:
        return "entry"
    if module == "jaxind":  # the face: imports errors and ModelConfig; everything else by name, lazily
        return "models"
    if module.startswith("converters"):
        return "converters"
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in FLOORS else "base"


def test_no_arrow_up():
    graph = import_graph(ROOT)
    up = [
        f"{m} ({floor(m)}) -> {d} ({floor(d)})"
        for m, deps in graph.items()
        for d in deps
        if FLOORS.index(floor(d)) > FLOORS.index(floor(m))
    ]
    assert not up, up
    folders = {m.split(".")[1] for m in graph if m.count(".") == 2 and m.startswith("jaxind.")}
    flat = {m for m in graph if m.count(".") == 1 and m.startswith("jaxind.") and m.split(".")[1] not in folders}
    flat -= BASE | ENTRIES
    assert not flat, f"modules outside the folders: {sorted(flat)}"
    assert folders == set(FLOORS) - {"base", "converters", "entry"}, folders


def test_floor_check_sees_an_arrow_up(tmp_path):
    (tmp_path / "jaxind" / "models").mkdir(parents=True)
    (tmp_path / "jaxind" / "cli").mkdir()
    for init in ("jaxind", "jaxind/models", "jaxind/cli"):
        (tmp_path / init / "__init__.py").write_text("")
    (tmp_path / "jaxind" / "cli" / "main.py").write_text("X = 1\n")
    (tmp_path / "jaxind" / "models" / "model.py").write_text("def f():\n    from jaxind.cli import main\n")
    graph = import_graph(tmp_path, ("jaxind",))
    assert {(floor(m), floor(d)) for m, deps in graph.items() for d in deps if d != "jaxind"} == {("models", "cli")}


def test_cycle_finder_sees_function_level_and_package_imports(tmp_path):
    (tmp_path / "p").mkdir()
    (tmp_path / "q").mkdir()
    (tmp_path / "p" / "__init__.py").write_text("from p.core import thing\n")
    (tmp_path / "p" / "core.py").write_text("def thing():\n    from q.io import read\n    return read\n")
    (tmp_path / "q" / "__init__.py").write_text("")
    (tmp_path / "q" / "io.py").write_text("from p.types import Alias\n")  # runs p/__init__.py first
    (tmp_path / "p" / "types.py").write_text("Alias = int\n")
    cycle = find_cycle(import_graph(tmp_path, ("p", "q")))
    assert cycle is not None and {"p", "p.core", "q.io"} <= set(cycle)


# --- what docstrings and docs cite -----------------------------------------------------------

_CITATION = re.compile(r"((?:[\w.-]+/)*[\w.-]+\.md)((?:\s*(?:§|,\s*§)\s*\d+(?:\.\d+)?)*)")
_SOURCES = [p for d in (*PACKAGES, "tests", "benchmarks") for p in (ROOT / d).rglob("*.py")]
_DOCS = [ROOT / "README.md", ROOT / "BUILD.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").glob("*.md"))]


def _sections(md: Path) -> set[str]:
    """Section numbers of a Markdown file: ``## 3. Title`` -> "3", ``### 5.1 Title`` -> "5.1"."""
    return set(re.findall(r"^#{2,4}\s+(\d+(?:\.\d+)?)\.?\s", md.read_text(), flags=re.M))


# Markdown files jaxind writes (the sweep report), named in code and docs but not cited as documentation.
GENERATED = {"report.md"}


def citations() -> list[tuple[Path, str, list[str]]]:
    out = []
    for path in _SOURCES + _DOCS:
        for match in _CITATION.finditer(path.read_text()):
            if Path(match.group(1)).name in GENERATED and not match.group(2):
                continue
            out.append((path, match.group(1), re.findall(r"\d+(?:\.\d+)?", match.group(2))))
    return out


def test_cited_files_and_sections_exist():
    found = citations()
    assert any(file == "docs/DESIGN.md" and sections for _, file, sections in found)  # the code does cite it
    missing = []
    for path, file, sections in found:
        target = next((c for c in (ROOT / file, path.parent / file) if c.is_file()), None)
        if target is None:
            missing.append(f"{path.relative_to(ROOT)}: {file}")
            continue
        missing += [f"{path.relative_to(ROOT)}: {file} §{s}" for s in sections if s not in _sections(target)]
    assert not missing, missing


_ROLE = re.compile(r":(?:func|class|mod|meth|data|attr):`~?([\w.]+)`")


@pytest.mark.parametrize("name", sorted(module_files(ROOT)))
def test_docstring_references_resolve(name):
    """Every ``:func:``/``:class:``/``:mod:``/... reference names something that exists: dotted
    names from their package, bare names in the citing module."""
    module = importlib.import_module(name)
    broken = []
    for target in sorted(set(_ROLE.findall(Path(module.__file__).read_text()))):
        head = target.split(".")[0]
        obj = None
        if head in ("jaxind", "converters", "launch", "scipy", "optax", "numpy", "jax"):
            parts = target.split(".")
            for i in range(len(parts), 0, -1):  # longest importable prefix, then attributes
                try:
                    obj = importlib.import_module(".".join(parts[:i]))
                except ImportError:
                    continue
                for attr in parts[i:]:
                    obj = getattr(obj, attr, None)
                break
        else:  # in the citing module, else anywhere in the project (e.g. a name imported inside a function)
            for owner in [module, *map(importlib.import_module, sorted(module_files(ROOT)))]:
                obj = owner
                for attr in target.split("."):
                    obj = getattr(obj, attr, None)
                if obj is not None:
                    break
        if obj is None:
            broken.append(target)
    assert not broken, f"{name} cites {broken}"


def test_no_function_over_80_lines():
    long = []
    for path in (p for d in PACKAGES for p in (ROOT / d).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > 80:
                    long.append(f"{os.path.relpath(path, ROOT)}:{node.lineno} {node.name} ({length} lines)")
    assert not long, long


def test_no_merge_conflict_markers_in_tracked_text():
    """No file carries a leftover merge-conflict marker (a bad merge once left them in the docs)."""
    import subprocess

    files = subprocess.run(["git", "ls-files"], capture_output=True, text=True, cwd=REPO, check=True).stdout.split()
    markers = ("<<<<<<< ", ">>>>>>> ")
    found = []
    for name in files:
        if not name.endswith((".py", ".md", ".toml", ".yaml", ".yml", ".sh", ".sbatch", ".flags", ".txt", ".json")):
            continue
        with open(os.path.join(REPO, name), encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, 1):
                if line.startswith(markers) or line.rstrip("\n") == "=======":
                    found.append(f"{name}:{number}")
    assert not found, found
