"""pyproject.toml lists every package of the two folders under the name
users import (a package left out would be missing from the wheel while the
editable install still found it), and the package itself says who it is."""

from __future__ import annotations

import subprocess
import sys
import tomllib

import pybroker
import pybroker.server
from helpers.modules import FOLDERS, ROOT, modules

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_package_is_listed_for_the_wheel() -> None:
    packages = sorted(name for name, path in modules().items() if path.name == "__init__.py")
    assert sorted(PYPROJECT["tool"]["setuptools"]["packages"]) == packages


def test_the_folders_map_to_the_import_names() -> None:
    assert PYPROJECT["tool"]["setuptools"]["package-dir"] == {name: folder for name, folder in FOLDERS.items()}
    assert PYPROJECT["project"]["scripts"] == {"pybroker": "pybroker.server.cli:main"}


def test_version_type_marker_and_python_m() -> None:
    assert pybroker.__version__ == pybroker.server.__version__ == PYPROJECT["project"]["version"]
    assert (ROOT / "client" / "py.typed").exists()
    assert "py.typed" in PYPROJECT["tool"]["setuptools"]["package-data"]["pybroker"]
    result = subprocess.run(
        [sys.executable, "-m", "pybroker", "--version"], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == f"pybroker {pybroker.__version__}"


def test_importing_the_client_does_not_load_the_server() -> None:
    check = "import sys, pybroker; print(sorted(m for m in sys.modules if m.startswith('pybroker.server')))"
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip() == "[]"
