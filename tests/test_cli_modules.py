"""How the ``pybroker`` command's modules depend on each other and on the bench.

``pybroker.server.cli`` hands ``pybroker bench`` to ``pybroker.server.bench``
from inside ``main()``; the bench imports the ``serve`` flags from
``pybroker.server.cli.serve``.
Read from the source (the AST), so every import order is covered, not only
the one a test happens to use; plus fresh interpreters for what loading a
module really pulls in.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest


from pybroker.server.cli import build_parser
from pybroker.server.cli.serve import serve_parser

from helpers.modules import modules

#: Bound on a fresh interpreter importing a module.
TIMEOUT = 30.0

MODULES = modules()


def _known(name: str) -> str | None:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _load_time_imports(name: str) -> set[str]:
    """The modules that importing NAME runs: its top-level imports (also in
    module-level if/try, not under ``if TYPE_CHECKING:``, not in functions),
    with the packages each one's import runs first, except NAME's own."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(statements: list[ast.stmt]) -> None:
        for node in statements:
            if isinstance(node, ast.Import):
                found.update(t for a in node.names if (t := _known(a.name)))
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([node.module] if node.module else []))
                for alias in node.names:
                    target = f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else _known(base)
                    if target:
                        found.add(target)
            elif isinstance(node, ast.If):
                test = node.test
                if "TYPE_CHECKING" not in (getattr(test, "id", None), getattr(test, "attr", None)):
                    visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                for block in (node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)):
                    visit(block)
            elif isinstance(node, ast.With):
                visit(node.body)

    visit(ast.parse(path.read_text(), str(path)).body)
    for target in list(found):
        parts = target.split(".")
        found.update(".".join(parts[:i]) for i in range(1, len(parts)))
    return {t for t in found if t in MODULES and not (name == t or name.startswith(t + "."))}


def _cycle_through(start: str, graph: dict[str, set[str]]) -> list[str] | None:
    """A path START -> ... -> START, if there is one."""
    stack = [(start, [start])]
    seen = set()
    while stack:
        node, path = stack.pop()
        for nxt in graph[node]:
            if nxt == start:
                return [*path, start]
            if nxt not in seen:
                seen.add(nxt)
                stack.append((nxt, [*path, nxt]))
    return None


GRAPH = {name: _load_time_imports(name) for name in MODULES}
CLI_AND_BENCH = sorted(n for n in MODULES if n.split(".")[:3] in (["pybroker", "server", "cli"], ["pybroker", "server", "bench"]))


def test_the_graph_sees_the_imports_it_should() -> None:
    """The reader is not blind: the bench's import of the serve flags and the
    CLI's imports of its commands are there."""
    assert len(CLI_AND_BENCH) > 10
    assert "pybroker.server.cli.serve" in GRAPH["pybroker.server.bench.cli"]
    assert "pybroker.server.cli" in GRAPH["pybroker.server.bench.cli"]  # importing pybroker.server.cli.serve runs it first
    assert {"pybroker.server.cli.serve", "pybroker.server.cli.tools", "pybroker.server.cli.auth", "pybroker.server.cli.flags"} <= GRAPH["pybroker.server.cli"]


@pytest.mark.parametrize("name", CLI_AND_BENCH)
def test_no_load_time_import_cycle(name: str) -> None:
    assert _cycle_through(name, GRAPH) is None


def test_nothing_outside_the_bench_loads_it() -> None:
    """No module imports the bench when it is loaded: ``pybroker bench``
    reaches it through the import inside ``pybroker.server.cli.main()``."""
    assert [n for n, targets in GRAPH.items() if not n.startswith("pybroker.server.bench") and any(
        t == "pybroker.server.bench" or t.startswith("pybroker.server.bench.") for t in targets
    )] == []


@pytest.mark.parametrize(
    ("module", "loads", "does_not_load"),
    [
        # The server only when serve runs; the bench only when bench runs.
        ("pybroker.server.cli", ["pybroker.server.cli.serve", "pybroker.server.cli.tools", "pybroker.server.cli.auth"], ["pybroker.server.bench", "pybroker.server.server"]),
        ("pybroker.server.bench.cli", ["pybroker.server.cli.serve", "pybroker.server.bench.fanout"], ["pybroker.server.server"]),
        # The load processes: neither the scenarios nor the CLI.
        ("pybroker.server.bench.worker", ["pybroker.server.bench"], ["pybroker.server.bench.cli", "pybroker.server.cli"]),
    ],
    ids=["pybroker.server.cli", "pybroker.server.bench.cli", "pybroker.server.bench.worker"],
)
def test_what_a_fresh_interpreter_loads(module: str, loads: list[str], does_not_load: list[str]) -> None:
    check = (
        f"import sys, {module}; "
        f"print([m for m in {loads!r} if m not in sys.modules], [m for m in {does_not_load!r} if m in sys.modules])"
    )
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[] []"


@pytest.mark.parametrize(
    "words",
    [
        [],
        ["--fsync", "never"],
        ["--fsync=interval", "--fsync-interval-ms", "50", "--port", "0", "--retention", "12h"],
        ["--max-connections", "3", "--idle-timeout", "0", "--no-http"],
    ],
)
def test_the_bench_reads_serve_flags_as_pybroker_serve_does(words: list[str]) -> None:
    assert serve_parser().parse_args(["serve", *words]) == build_parser().parse_args(["serve", *words])
