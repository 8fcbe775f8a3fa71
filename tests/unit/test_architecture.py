"""The layering and size rules of orchestrator/, read from the source with `ast`.

Layers: core → db → domain packages (resources, workers, workspaces, then jobs) → api / engine / cli;
agents, executors and mcp never reach the database. Every import counts, including imports inside
functions and under TYPE_CHECKING: a deferred import still ties the packages together."""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "orchestrator"

MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60

DOMAIN = ("jobs", "workers", "resources", "workspaces")

# Modules over MAX_MODULE_LINES (paths relative to orchestrator/): none.
MODULE_EXCEPTIONS: frozenset[str] = frozenset()

# Functions over MAX_FUNCTION_LINES, as "path:qualified name".
FUNCTION_EXCEPTIONS: frozenset[str] = frozenset(
    {
        # The unit-of-work rewrite owns these (db/ and the services' commit code).
        "db/transitions.py:_transition",
        "db/transitions.py:transition_many",
        # A migration is one schema written out table by table; it is never changed once shipped.
        "db/migrations/versions/0001_initial_schema.py:upgrade",
    }
)


@dataclass(frozen=True)
class Import:
    source: str  # module path relative to orchestrator/
    line: int
    target: str  # dotted module name imported, e.g. orchestrator.db.models


def _module_name(rel: Path) -> list[str]:
    parts = ["orchestrator", *rel.parts[:-1]]
    return parts if rel.name == "__init__.py" else [*parts, rel.stem]


def _submodule(module: str, name: str) -> str:
    """`module.name` when that is a module or package of orchestrator/, else `module`."""
    path = PACKAGE.joinpath(*module.split(".")[1:], name)
    return f"{module}.{name}" if path.with_suffix(".py").exists() or path.is_dir() else module


def _imports_of(path: Path) -> list[Import]:
    rel = path.relative_to(PACKAGE)
    found: list[Import] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [Import(rel.as_posix(), node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = _module_name(rel)
                if rel.name != "__init__.py":
                    base = base[:-1]
                base = base[: len(base) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            # `from orchestrator.jobs import repository` imports the module jobs.repository.
            found += [Import(rel.as_posix(), node.lineno, _submodule(module, a.name)) for a in node.names]
    return [i for i in found if i.target.startswith("orchestrator.")]


def _package_of(rel: str) -> str:
    """The top-level package of a module path; a module at the top (bootstrap.py) is its own node."""
    first = rel.split("/", 1)[0]
    return first.removesuffix(".py")


def _target_package(target: str) -> str:
    return target.split(".")[1]


def all_imports() -> list[Import]:
    return [i for path in sorted(PACKAGE.rglob("*.py")) for i in _imports_of(path)]


def package_graph(imports: list[Import]) -> dict[str, dict[str, list[Import]]]:
    graph: dict[str, dict[str, list[Import]]] = defaultdict(lambda: defaultdict(list))
    for imp in imports:
        source, target = _package_of(imp.source), _target_package(imp.target)
        if source != target:
            graph[source][target].append(imp)
    return graph


def cycles(graph: dict[str, dict[str, list[Import]]]) -> list[list[str]]:
    """Strongly connected components of more than one package (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in graph.get(node, {}):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def forbidden(imp: Import) -> str | None:
    """Why this import breaks the layering, or None."""
    source, target = _package_of(imp.source), _target_package(imp.target)
    if source == target:
        return None
    domain_repository = any(imp.target.startswith(f"orchestrator.{d}.repository") for d in DOMAIN)
    if source in ("agents", "executors", "mcp") and (target == "db" or domain_repository):
        return f"{source} never touches the database"
    if source == "core":
        return "core imports nothing above it"
    if source == "db" and target not in ("core",):
        return "db imports only core"
    if source in DOMAIN and target in ("api", "engine", "cli", "bootstrap", "mcp", "streams"):
        return "a domain package does not import the layers above it"
    return None


def test_no_package_import_cycles() -> None:
    graph = package_graph(all_imports())
    report = []
    for component in cycles(graph):
        for a in component:
            for b in component:
                for imp in graph.get(a, {}).get(b, []):
                    report.append(f"{imp.source}:{imp.line} imports {imp.target}")
    assert not report, "package import cycle:\n" + "\n".join(report)


def test_no_import_against_the_layering() -> None:
    broken = [
        f"{i.source}:{i.line} imports {i.target}: {why}" for i in all_imports() if (why := forbidden(i))
    ]
    assert not broken, "\n".join(broken)


def _functions(tree: ast.AST, prefix: str = "") -> list[tuple[str, int]]:
    """(qualified name, lines) of every function and method, nested ones included."""
    out: list[tuple[str, int]] = []
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            name = f"{prefix}{node.name}"
            assert node.end_lineno is not None
            out.append((name, node.end_lineno - node.lineno + 1))
            out += _functions(node, f"{name}.")
        elif isinstance(node, ast.ClassDef):
            out += _functions(node, f"{prefix}{node.name}.")
        else:
            out += _functions(node, prefix)
    return out


def test_module_length() -> None:
    over = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        lines = len(path.read_text().splitlines())
        if lines > MAX_MODULE_LINES and rel not in MODULE_EXCEPTIONS:
            over.append(f"{rel}: {lines} lines")
    assert not over, f"modules over {MAX_MODULE_LINES} lines:\n" + "\n".join(over)


def test_function_length() -> None:
    over = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        for name, lines in _functions(ast.parse(path.read_text())):
            if lines > MAX_FUNCTION_LINES and f"{rel}:{name}" not in FUNCTION_EXCEPTIONS:
                over.append(f"{rel}:{name}: {lines} lines")
    assert not over, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(over)


def test_exceptions_still_exist() -> None:
    """A stale exception would hide the next offender of the same name: each must still be over."""
    stale = []
    for rel in MODULE_EXCEPTIONS:
        path = PACKAGE / rel
        if not path.exists() or len(path.read_text().splitlines()) <= MAX_MODULE_LINES:
            stale.append(rel)
    for entry in FUNCTION_EXCEPTIONS:
        rel, name = entry.split(":")
        path = PACKAGE / rel
        lengths = dict(_functions(ast.parse(path.read_text()))) if path.exists() else {}
        if lengths.get(name, 0) <= MAX_FUNCTION_LINES:
            stale.append(entry)
    assert not stale, "exceptions no longer needed (remove them):\n" + "\n".join(sorted(stale))


# The checks themselves: each must see what it is meant to catch.


def _write(tmp: Path, rel: str, text: str) -> Path:
    path = tmp / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_the_checks_catch_what_they_are_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "orchestrator"
    _write(root, "jobs/service.py", "def f():\n    from orchestrator.workers import service\n")
    _write(root, "workers/service.py", "from ..jobs import repository\n")
    _write(root, "mcp/server.py", "from orchestrator.db.models import Job\n")
    _write(root, "core/x.py", "from orchestrator import jobs\n")
    _write(root, "workers/repository.py", "")
    _write(root, "executors/x.py", "from orchestrator.workers import repository as workers_repo\n")
    _write(root, "db/x.py", "import orchestrator.workers.repository\n")
    _write(root, "cli/long.py", "def f():\n" + "    pass\n" * MAX_FUNCTION_LINES)
    monkeypatch.setattr(__import__(__name__, fromlist=["x"]), "PACKAGE", root)
    graph = package_graph(all_imports())
    assert cycles(graph) == [["jobs", "workers"]]
    why = {f"{i.source}->{i.target}": forbidden(i) for i in all_imports()}
    assert why["mcp/server.py->orchestrator.db.models"] == "mcp never touches the database"
    assert why["executors/x.py->orchestrator.workers.repository"] == "executors never touches the database"
    assert why["core/x.py->orchestrator.jobs"] == "core imports nothing above it"
    assert why["db/x.py->orchestrator.workers.repository"] == "db imports only core"
    assert why["workers/service.py->orchestrator.jobs"] is None  # the relative import, resolved
    with pytest.raises(AssertionError, match=re.escape("cli/long.py:f: 61 lines")):
        test_function_length()
    with pytest.raises(
        AssertionError, match=re.escape("jobs/service.py:2 imports orchestrator.workers.service")
    ):
        test_no_package_import_cycles()
