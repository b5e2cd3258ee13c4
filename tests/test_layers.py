"""The layers of broker/README.md hold: no module imports one above it.

Read from the source (the AST), not by importing: every import a module
makes when it loads (not those under ``if TYPE_CHECKING:``, which are for
annotations, nor those inside functions, which are deliberate late imports
such as the CLI's ``serve`` loading the server) must go to a module of the
same layer or a lower one, and the two transports never import each other.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from helpers.modules import modules

#: Lowest first. A module's layer is that of its longest matching prefix.
LAYERS: dict[str, int] = {
    "pybroker.protocol": 0,
    "pybroker.server": 1,  # the package itself: its version
    "pybroker.server.logs": 1,
    "pybroker.server.stats": 1,
    "pybroker.server.closing": 1,
    "pybroker.server.listening": 1,
    "pybroker.server.storage": 2,
    "pybroker.server.cluster": 2,  # etcd and S3 clients: storage-level, below the core
    "pybroker.server.cluster.groupstate": 3,  # consumer groups' state in etcd: beside the groups
    "pybroker.server.cluster.delayed": 3,  # delayed batches in etcd: beside broker/delays
    "pybroker.server.config": 3,
    "pybroker.server.permissions": 3,
    "pybroker.server.auth": 3,
    "pybroker.server.principal": 3,
    "pybroker.server.start": 3,
    "pybroker.server.subscriber": 3,
    "pybroker.server.inboxes": 3,
    "pybroker.server.router": 3,
    "pybroker.server.committer": 3,
    "pybroker.server.dedup": 3,
    "pybroker.server.delays": 3,
    "pybroker.server.groups": 3,
    "pybroker.server.framebudget": 3,
    "pybroker.server.tls": 3,
    "pybroker.server.core": 4,
    "pybroker.server.session": 5,
    "pybroker.server.http": 5,
    "pybroker.server.server": 6,
    "pybroker.server.testing": 6,
    "pybroker.server.pytest_plugin": 6,
    "pybroker._version": 0,
    "pybroker": 6,  # the client library (above the codec)
    "pybroker.__main__": 7,  # python -m pybroker: the CLI
    "pybroker.server.cli": 7,
    "pybroker.server.bench": 7,
}
TRANSPORTS = ("pybroker.server.session", "pybroker.server.http")


def layer(name: str) -> int:
    best = max((p for p in LAYERS if name == p or name.startswith(p + ".")), key=len)
    return LAYERS[best]


def load_time_imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    tree = ast.parse(path.read_text("utf-8"))
    is_package = path.name == "__init__.py"
    out: set[str] = set()

    def visit(statements: list[ast.stmt]) -> None:
        for node in statements:
            if isinstance(node, ast.If):
                if "TYPE_CHECKING" not in ast.unparse(node.test):
                    visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
                for handler in node.handlers:
                    visit(handler.body)
            elif isinstance(node, ast.Import):
                out.update(a.name for a in node.names if a.name in known)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    if sub in known:
                        out.add(sub)
                    elif target in known:
                        out.add(target)

    visit(tree.body)
    out.discard(name)
    return out


KNOWN = modules()


def test_every_module_has_a_layer() -> None:
    for name in KNOWN:
        layer(name)  # raises if no prefix matches


@pytest.mark.parametrize("name", sorted(KNOWN))
def test_no_import_goes_up(name: str) -> None:
    mine = layer(name)
    for target in sorted(load_time_imports(name, KNOWN[name], KNOWN)):
        assert layer(target) <= mine, f"{name} (layer {mine}) imports {target} (layer {layer(target)})"
        for a, b in (TRANSPORTS, TRANSPORTS[::-1]):
            if name == a or name.startswith(a + "."):
                assert not (target == b or target.startswith(b + ".")), f"{name} imports the other transport {target}"


def test_the_check_sees_imports() -> None:
    """The reader finds what is there (so the test above can fail)."""
    assert "pybroker.server.core" in load_time_imports("pybroker.server.server", KNOWN["pybroker.server.server"], KNOWN)
    assert "pybroker.server.router" in load_time_imports("pybroker.server.core", KNOWN["pybroker.server.core"], KNOWN)
    # session/__init__ re-exports from its module: a relative import.
    assert "pybroker.server.session.session" in load_time_imports("pybroker.server.session", KNOWN["pybroker.server.session"], KNOWN)
    # The router names its groups for annotations only.
    assert not any(
        t.startswith("pybroker.server.groups") for t in load_time_imports("pybroker.server.router", KNOWN["pybroker.server.router"], KNOWN)
    )
