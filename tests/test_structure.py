"""Structure rules of the code base, checked from the source text (cheap: no package module is imported).

* no import cycle among ``streaming_weights``'s modules (lazy imports inside functions count);
* nothing in ``streaming_weights.server`` imports ``streaming_weights.client``, directly or through other
  modules (the server must not know the client), and the other layers of docs/architecture.md point one
  way too; only the CLI imports the CLI and the benchmark suite;
* no file in ``src/`` over 450 lines and no function over 60 lines (docstring included);
* no ``sys.path`` edits anywhere under ``tests/`` (the tests are found as a package);
* the tests mirror the tree: ``tests/{format,storage,protocol,server,client,models}/test_*.py`` exist.

How the import graph is built (see :func:`import_graph`): every ``import``/``from ... import`` statement of
every module, at any depth, relative ones resolved, plus the modules a module that calls
``importlib.import_module`` names in its string constants (lazy ``__getattr__`` tables, command lists). ``from M import n`` imports ``M.n`` when that is a module, else ``M``. Importing ``a.b.c`` also runs
the ``__init__`` of ``a.b`` and ``a``, so those are edges too — except packages that contain the importer,
which are always already initialising when it runs (counting them would make every re-exporting
``__init__`` a cycle with its own submodules). Imports under ``if TYPE_CHECKING:`` never execute, so they are
left out of the cycle check but count for the layering rule (a type-only dependency is still knowledge).
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PACKAGE = "streaming_weights"
TESTS = ROOT / "tests"

MAX_FILE_LINES = 450
MAX_FUNCTION_LINES = 60
MIRRORED = ("format", "storage", "protocol", "server", "client", "models")


# ------------------------------------------------------------------------------------------ modules
def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (``pkg/__init__.py`` is ``pkg``)."""
    out = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = module_files()


def is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


@dataclass(frozen=True)
class Import:
    """One import statement's resolved target (a module of the package) and where it was written."""

    target: str
    line: int
    type_only: bool  # under ``if TYPE_CHECKING:``


def _resolve_relative(importer: str, level: int, module: str | None) -> str:
    base = importer.split(".") if is_package(importer) else importer.split(".")[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def _existing(name: str) -> str | None:
    """``name`` if it is a package module, else its longest prefix that is one (``import a.b.attr`` forms)."""
    parts = name.split(".")
    while parts:
        if ".".join(parts) in MODULES:
            return ".".join(parts)
        parts.pop()
    return None


def _with_inits(importer: str, target: str) -> list[str]:
    """``target`` plus the packages above it whose ``__init__`` importing it runs (those not containing
    ``importer``)."""
    out = [target]
    parts = target.split(".")[:-1]
    while parts:
        pkg = ".".join(parts)
        if importer == pkg or importer.startswith(pkg + "."):
            break
        out.append(pkg)
        parts.pop()
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _type_only_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for stmt in node.body:
                lines.update(range(stmt.lineno, (stmt.end_lineno or stmt.lineno) + 1))
    return lines


def _targets(importer: str, node: ast.AST) -> list[str]:
    """Package modules one AST node imports (before adding the ``__init__`` edges)."""
    if isinstance(node, ast.Import):
        return [t for a in node.names if (t := _existing(a.name))]
    if isinstance(node, ast.ImportFrom):
        base = _resolve_relative(importer, node.level, node.module) if node.level else (node.module or "")
        if base != PACKAGE and not base.startswith(PACKAGE + "."):
            return []
        out = []
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            if sub in MODULES:
                out.append(sub)
            elif base != importer and (t := _existing(base)):
                out.append(t)
        return out
    return []


def _calls_import_module(tree: ast.AST) -> bool:
    return any(isinstance(n, ast.Call) and "import_module" in (getattr(n.func, "attr", None), getattr(n.func, "id", None))
               for n in ast.walk(tree))


def _named_modules(importer: str, tree: ast.AST) -> list[tuple[str, int]]:
    """Lazy imports by name (``importlib.import_module``): in a module that calls it, every string constant
    that names a package module — absolute, relative (``".chunker"``) or a bare submodule name of the
    importer's package (``f"{__name__}.{name}"`` over a tuple of names) — with its line."""
    package = importer if is_package(importer) else importer.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value):
            continue
        text = node.value
        if text.startswith("."):
            level = len(text) - len(text.lstrip("."))
            name = _resolve_relative(importer, level, text.lstrip(".") or None)
        elif text.startswith(PACKAGE + "."):
            name = text
        elif text.isidentifier():
            name = f"{package}.{text}"
        else:
            continue
        if name in MODULES:
            found.append((name, node.lineno))
    return found


def imports_of(name: str) -> list[Import]:
    """Every package module that module ``name`` imports, with the line of the statement."""
    tree = ast.parse(MODULES[name].read_text(), filename=str(MODULES[name]))
    type_only = _type_only_lines(tree)
    found = []
    targets = [(t, node.lineno) for node in ast.walk(tree) for t in _targets(name, node)]
    if _calls_import_module(tree):
        targets += _named_modules(name, tree)
    for target, line in targets:
        for t in _with_inits(name, target):
            if t != name:
                found.append(Import(t, line, line in type_only))
    return found


def import_graph(*, runtime_only: bool) -> dict[str, dict[str, int]]:
    """``{importer: {imported: first line}}`` over the package's modules."""
    graph: dict[str, dict[str, int]] = {}
    for name in MODULES:
        edges = graph.setdefault(name, {})
        for imp in imports_of(name):
            if not (runtime_only and imp.type_only):
                edges.setdefault(imp.target, imp.line)
    return graph


def strongly_connected(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Tarjan's strongly connected components of ``graph``, each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def import_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Components with more than one module, or a module importing itself."""
    return [c for c in strongly_connected(graph) if len(c) > 1 or c[0] in graph.get(c[0], {})]


def describe_cycle(graph: dict[str, dict[str, int]], comp: list[str]) -> str:
    members = set(comp)
    edges = [f"    {a} -> {b}  ({MODULES[a].relative_to(ROOT)}:{graph[a][b]})"
             for a in comp for b in sorted(graph[a]) if b in members]
    return "cycle among " + ", ".join(comp) + ":\n" + "\n".join(edges)


def path_between(graph: dict[str, dict[str, int]], start: str, goal) -> list[str] | None:
    """Shortest import chain from ``start`` to a module for which ``goal(name)`` holds (breadth first)."""
    previous: dict[str, str | None] = {start: None}
    queue = [start]
    for v in queue:
        if v != start and goal(v):
            chain = [v]
            while (p := previous[chain[-1]]) is not None:
                chain.append(p)
            return chain[::-1]
        for w in graph.get(v, {}):
            if w not in previous:
                previous[w] = v
                queue.append(w)
    return None


def under(package: str):
    return lambda name: name == package or name.startswith(package + ".")


# ------------------------------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def full_graph() -> dict[str, dict[str, int]]:
    """The package's graph with type-only imports (built once: parsing every module is the slow part)."""
    return import_graph(runtime_only=False)


def test_the_graph_sees_the_package(full_graph):
    """Guards the checks below against passing vacuously (no modules found, or no edges resolved)."""
    graph = full_graph
    assert f"{PACKAGE}.server" in MODULES and f"{PACKAGE}.client" in MODULES
    assert sum(len(e) for e in graph.values()) > len(MODULES)
    assert import_cycles({"a": {"b": 1}, "b": {"a": 1}, "c": {"c": 1}, "d": {"a": 1}}) == [["a", "b"], ["c"]]


def test_the_graph_resolves_relative_lazy_and_named_imports(tmp_path, monkeypatch):
    """A throwaway package with each import form the graph must see (and one it must not)."""
    files = {
        "__init__.py": "import importlib\n_LAZY = {'A': '.a'}\n"
                       "def __getattr__(n):\n    return importlib.import_module(_LAZY[n], __name__)\n",
        "a.py": "from . import b\n",
        "b.py": "def f():\n    from .sub.c import x\n",  # lazy, inside a function
        "sub/__init__.py": "",
        "sub/c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..a import y\nfrom .. import d\n",
        "d.py": "import streaming_weights.a\n",
    }
    for rel, text in files.items():
        (tmp_path / PACKAGE / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / PACKAGE / rel).write_text(text)
    this = sys.modules[__name__]
    monkeypatch.setattr(this, "SRC", tmp_path)
    monkeypatch.setattr(this, "MODULES", module_files())
    p = PACKAGE
    graph = {k: set(v) for k, v in import_graph(runtime_only=True).items()}
    assert graph == {p: {f"{p}.a"}, f"{p}.a": {f"{p}.b"}, f"{p}.b": {f"{p}.sub.c", f"{p}.sub"},
                     f"{p}.sub": set(), f"{p}.sub.c": {f"{p}.d"}, f"{p}.d": {f"{p}.a"}}
    assert import_cycles(import_graph(runtime_only=True)) == [[f"{p}.a", f"{p}.b", f"{p}.d", f"{p}.sub.c"]]
    assert f"{p}.a" in import_graph(runtime_only=False)[f"{p}.sub.c"]  # the TYPE_CHECKING import, for layering


def test_no_import_cycles():
    graph = import_graph(runtime_only=True)
    cycles = import_cycles(graph)
    assert not cycles, "\n".join(describe_cycle(graph, c) for c in cycles)


# Dependencies point one way (docs/architecture.md): each lower layer must not reach, through any chain of
# imports, the layers above it. ``server`` not knowing ``client`` is the rule issue 11 names; the rest hold
# the picture in place. Command entry points (``__main__`` modules, the ``weight_server`` compatibility
# module) are the CLI's, so they are left out.
ENTRY_POINTS = {f"{PACKAGE}.__main__", f"{PACKAGE}.chunker.__main__", f"{PACKAGE}.weight_server"}
MUST_NOT_REACH = {
    "server": ("client", "models", "chunker", "cli", "benchmarks", "api"),
    "protocol": ("storage", "server", "client", "models", "chunker", "cli", "benchmarks", "api"),
    "storage": ("protocol", "server", "client", "models", "chunker", "cli", "benchmarks", "api"),
    "format": ("protocol", "server", "client", "models", "chunker", "cli", "benchmarks", "api"),
    "client": ("server", "models", "chunker", "cli", "benchmarks", "api"),
    "models": ("server", "chunker", "cli", "benchmarks", "api"),
}


def _chains(graph: dict[str, dict[str, int]], low: str, high: str) -> list[list[str]]:
    return [chain for name in MODULES if under(f"{PACKAGE}.{low}")(name) and name not in ENTRY_POINTS
            if (chain := path_between(graph, name, under(f"{PACKAGE}.{high}")))]


def test_server_does_not_import_client(full_graph):
    chains = _chains(full_graph, "server", "client")
    assert not chains, "server modules reach the client:\n" + "\n".join("  " + " -> ".join(c) for c in chains)


@pytest.mark.parametrize(("low", "high"), [(lo, hi) for lo, his in MUST_NOT_REACH.items() for hi in his],
                         ids=lambda v: v)
def test_layers_point_one_way(full_graph, low, high):
    chains = _chains(full_graph, low, high)
    assert not chains, f"{low} reaches {high}:\n" + "\n".join("  " + " -> ".join(c) for c in chains)


@pytest.mark.parametrize("top", ["cli", "benchmarks"])
def test_only_the_cli_imports_the_cli_and_the_benchmarks(full_graph, top):
    graph = full_graph
    allowed = under(f"{PACKAGE}.cli")
    users = sorted(f"{name} ({MODULES[name].relative_to(ROOT)}:{graph[name][t]})"
                   for name in MODULES if name not in ENTRY_POINTS and not allowed(name)
                   and not under(f"{PACKAGE}.{top}")(name)
                   for t in graph[name] if under(f"{PACKAGE}.{top}")(t))
    assert not users, f"library modules importing {top}: {users}"


def test_no_source_file_over_the_line_limit():
    long = {str(p.relative_to(ROOT)): n for p in sorted(SRC.rglob("*.py"))
            if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES}
    assert not long, f"files over {MAX_FILE_LINES} lines: {long}"


def test_no_function_over_the_line_limit():
    long = []
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines (docstring included):\n" + "\n".join(long)


_PYTHONPATH = "PYTHON" + "PATH"  # built, so this file's own check does not match itself


def _sys_path_edits(path: Path) -> list[str]:
    """Uses of ``sys.path``, ``PYTHONPATH``, ``site.addsitedir`` or pytest's ``syspath_prepend`` in a file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Attribute) and node.attr == "path" and getattr(node.value, "id", None) == "sys":
            found.append(f"{path.relative_to(ROOT)}:{node.lineno} sys.path")
        elif isinstance(node, ast.Attribute) and node.attr in ("syspath_prepend", "addsitedir"):
            found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.attr}")
        elif isinstance(node, (ast.Subscript, ast.Dict)):  # env["PYTHONPATH"] = ..., {"PYTHONPATH": ...}
            keys = [node.slice] if isinstance(node, ast.Subscript) else node.keys
            if any(isinstance(k, ast.Constant) and k.value == _PYTHONPATH for k in keys):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} {_PYTHONPATH}")
    return found


def test_no_sys_path_edits_under_tests():
    edits = [e for p in sorted(TESTS.rglob("*.py")) for e in _sys_path_edits(p)]
    assert not edits, "tests must import as the `tests` package, not by editing the path:\n" + "\n".join(edits)


def test_every_test_folder_is_a_package():
    """Without ``__init__.py`` pytest imports a folder's files by basename, and two folders' ``test_x.py``
    would collide; with it they are ``tests.<folder>.test_x``."""
    folders = sorted({p.parent for p in TESTS.rglob("*.py")})
    missing = [str(d.relative_to(ROOT)) for d in folders if not (d / "__init__.py").is_file()]
    assert not missing, f"test folders without __init__.py: {missing}"


@pytest.mark.parametrize("folder", MIRRORED)
def test_tests_mirror_the_package(folder):
    assert (SRC / PACKAGE / folder).is_dir(), f"src/{PACKAGE}/{folder}/ is gone: update MIRRORED"
    assert sorted((TESTS / folder).glob("test_*.py")), f"tests/{folder}/ has no test_*.py"


#: torch's hook registrations and instance-method replacement: how a model gets patched
_PATCH_CALLS = {"register_forward_pre_hook", "register_forward_hook", "register_module_forward_hook",
                "register_module_forward_pre_hook"}
PATCHING = SRC / PACKAGE / "models" / "patching.py"


def _patches(path: Path) -> list[str]:
    """Places in ``path`` that patch a module or model: torch hook registrations, assignments to a
    ``.forward`` / ``.generate`` attribute, ``obj.__dict__[...] = ...`` and ``setattr(obj, "forward", ...)``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in _PATCH_CALLS:
            found.append(f"{where} {node.func.attr}")
        elif isinstance(node, ast.Assign):
            for t in node.targets:
                if isinstance(t, ast.Attribute) and t.attr in ("forward", "generate"):
                    found.append(f"{where} .{t.attr} = ...")
                elif (isinstance(t, ast.Subscript) and isinstance(t.value, ast.Attribute)
                      and t.value.attr == "__dict__"):
                    found.append(f"{where} __dict__[...] = ...")
        elif (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setattr" and len(node.args) > 1
              and isinstance(node.args[1], ast.Constant) and node.args[1].value in ("forward", "generate")):
            found.append(f"{where} setattr(..., {node.args[1].value!r})")
    return found


def test_one_module_patches_models():
    """Units, edges, experts, placement, generation plumbing and the engine's scopes all patch through
    models/patching.py (add_hook / patch_method): one mechanism, one place to read."""
    found = [f for p in sorted(SRC.rglob("*.py")) if p != PATCHING for f in _patches(p)]
    assert not found, "patch models through models/patching.py (add_hook / patch_method):\n" + "\n".join(found)
    assert _patches(PATCHING), "the check no longer sees models/patching.py's own patching: update it"


#: collaborators an object is given at construction; assigning one into another object later is the
#: "valid only after later mutation" shape (restructure II)
COLLABORATORS = {"buffer_pool", "pool", "trust", "keep_fp32", "pacer", "converter", "source", "cache", "policy",
                 "placement", "monitor", "engine", "storage"}


def _late_collaborators(path: Path) -> list[str]:
    """Assignments of a collaborator attribute on anything but ``self`` / ``cls`` (``x.source.pool = p``,
    ``server.pacer = p``)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, (ast.AnnAssign, ast.AugAssign)) else []
        for t in targets:
            if (isinstance(t, ast.Attribute) and t.attr in COLLABORATORS
                    and not (isinstance(t.value, ast.Name) and t.value.id in ("self", "cls"))):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} {ast.unparse(t)} = ...")
    return found


def test_no_collaborator_is_assigned_after_construction():
    """Sources, pools, trust, converters, pacers… are passed to constructors (open_unit_source(pool=, trust),
    ConvertingSource(keep_fp32=resolver), WeightServer(pacer=)), never set on a built object."""
    found = [f for p in sorted(SRC.rglob("*.py")) for f in _late_collaborators(p)]
    assert not found, "pass collaborators to the constructor instead:\n" + "\n".join(found)


def test_environment_is_read_in_the_options_object_and_the_cli_only():
    """``SURFING_*`` variables are read by config.py (StreamingConfig, token_from_env) and the CLI only."""
    allowed = {SRC / PACKAGE / "config.py"}
    readers = []
    for path in sorted(SRC.rglob("*.py")):
        if path in allowed or (SRC / PACKAGE / "cli") in path.parents:
            continue
        text = path.read_text()
        for node in ast.walk(ast.parse(text, filename=str(path))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("SURFING_"):
                readers.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.value!r}")
    assert not readers, "read SURFING_* through streaming_weights.config:\n" + "\n".join(readers)
