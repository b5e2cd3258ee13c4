"""The protocol package is sealed: one façade, private modules behind it.

Like h11, ``pybroker.protocol`` (client/protocol/) keeps its parts in
private modules and re-exports every public name from its ``__init__.py``; nothing
else in the tree imports a module of the package directly.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pybroker.protocol as protocol

from helpers.modules import module_name

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "client" / "protocol"
TREES = ("broker", "client", "tests", "benchmarks")


def _python_files() -> list[Path]:
    files = [p for tree in TREES for p in (ROOT / tree).rglob("*.py")]
    return [p for p in files if PACKAGE not in p.parents and ".venv" not in p.parts]


def _package_of(path: Path) -> str:
    name = module_name(path)
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def _imported_modules(path: Path, package: str) -> list[tuple[int, str]]:
    """Every module ``path`` (a module of ``package``) imports, resolved to
    an absolute dotted name."""
    out: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            out.append((node.lineno, name))
            # ``from pybroker.protocol import _wire`` reaches in just the same.
            if name == "pybroker.protocol":
                out.extend((node.lineno, f"{name}.{a.name}") for a in node.names if a.name.startswith("_"))
    return out


def test_scanner_sees_relative_and_absolute_imports(tmp_path: Path) -> None:
    # The check below is only as good as its resolution of import forms.
    fake = tmp_path / "module.py"
    fake.write_text(
        "from ...protocol._wire import HEADER_SIZE\n"
        "from pybroker.protocol import _readers\n"
        "import pybroker.protocol._state\n"
        "from ...protocol import Connection\n"
        "from ...protocol._batch import split_records\n"
    )
    names = [name for _, name in _imported_modules(fake, "pybroker.server.http")]
    assert names == [
        "pybroker.protocol._wire",
        "pybroker.protocol",
        "pybroker.protocol._readers",
        "pybroker.protocol._state",
        "pybroker.protocol",
        "pybroker.protocol._batch",
    ]


def test_nothing_outside_the_package_imports_its_modules() -> None:
    leaks = [
        f"{path.relative_to(ROOT)}:{line}: {name}"
        for path in _python_files()
        for line, name in _imported_modules(path, _package_of(path))
        if name.startswith("pybroker.protocol.")
    ]
    assert leaks == []


def test_the_package_modules_are_private() -> None:
    modules = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")
    assert modules, "no modules found"
    assert [m for m in modules if not m.startswith("_")] == []


def test_the_facade_exports_exactly_its_all() -> None:
    names = protocol.__all__
    assert len(names) == len(set(names))
    missing = [n for n in names if not hasattr(protocol, n)]
    assert missing == []
    namespace: dict[str, object] = {}
    exec("from pybroker.protocol import *", namespace)
    assert sorted(k for k in namespace if k != "__builtins__") == sorted(names)


def test_every_public_name_of_the_private_modules_is_exported_or_internal() -> None:
    """A public name defined in a private module is either in ``__all__`` or
    on the list below of names only the package itself uses: adding one
    means deciding which."""
    internal = {
        # _wire: field layouts and flags, the readers' and writers' business
        "ACK_FIXED", "ALLOWED_FLAGS", "CREDIT", "DELIVER_BODY_FIXED", "DELIVER_FIXED",
        "ERROR_FIXED", "ERROR_FLAG_FATAL", "ERROR_FLAG_FIELDS", "ERROR_MESSAGE_CHARS",
        "GROUP_DELIVER_BODY_FIXED", "GROUP_DELIVER_FIXED", "GROUPS_CREATE_START", "INFO_ENTRY", "INFO_FLAG_AFTER", "INFO_FLAG_TRUNCATED",
        "PUBACK", "PUBLISH_BODY_FIXED", "PUBLISH_FIXED", "PUBLISH_FLAG_DEDUP", "PUBLISH_FLAG_DELAYED", "PUBLISH_FLAG_NEEDS_RECEIVER", "RANGE", "TOPICS_FIXED",
        "STR16_LENGTH", "SUBSCRIBE_START", "TYPES_BY_VALUE", "U8", "U16", "U32", "U64",
        # _state: the tables the connection applies
        "ADVANCES", "CLIENT_SENDS", "SENDS", "SERVER_SENDS",
        # _writers: the generic frame builder
        "frame",
    }
    unexported = []
    for path in sorted(PACKAGE.glob("_*.py")):
        if path.name == "__init__.py":
            continue
        tree = ast.parse(path.read_text())
        defined: set[str] = set()
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                defined.add(node.name)
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                defined.update(t.id for t in targets if isinstance(t, ast.Name))
        for name in sorted(defined):
            if name.startswith("_") or name in protocol.__all__ or name in internal:
                continue
            unexported.append(f"{path.stem}.{name}")
    assert unexported == []
