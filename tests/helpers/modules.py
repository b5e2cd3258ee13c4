"""The project's modules by the names users import them under, read from
the source folders (pyproject.toml's package-dir: client/ is ``pybroker``,
broker/ is ``pybroker.server``)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent

#: Import package -> its folder, the more specific first.
FOLDERS = {"pybroker.server": "broker", "pybroker": "client"}


def module_name(path: Path) -> str:
    """The dotted name ``path`` is imported as (outside the two packages:
    its path from the repository root, as tests and benchmarks are)."""
    parts = path.resolve().relative_to(ROOT).with_suffix("").parts
    for package, folder in FOLDERS.items():
        if parts[0] == folder:
            parts = (*package.split("."), *parts[1:])
            break
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    """Every module's dotted name and file (a package's is its __init__.py)."""
    return {module_name(path): path for folder in FOLDERS.values() for path in (ROOT / folder).rglob("*.py")}
