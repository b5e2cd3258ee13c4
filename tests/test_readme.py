"""The README's Python examples, run as written, from a fresh project.

A temporary project outside the repository gets a virtual environment with
pybroker installed into it by pip from (a copy of) this source tree, not the
editable install the suite runs on; the examples are read out of README.md
by these tests, never copied here:

- "In your tests": its conftest.py and test files are written into the
  project, whose pytest run (no configuration file; the README says none is
  needed) must pass every one of them;
- "From Python" (Trio) and "Without an event loop" (the blocking client)
  run as scripts, and the Flask and FastAPI snippets are served and called,
  against a ``pybroker serve`` of that installation. The one change made to
  them: their URL, pybroker://127.0.0.1:7420, becomes the test broker's.

The project's venv is made without pip and with a ``.pth`` line that puts
this venv's site-packages after its own: pytest, pytest-trio, trio, Flask,
pip and the build's setuptools and wheel (the test extra has them) come from
there, and ``pip install --no-deps --no-index --no-build-isolation`` of a
copy of the source tree installs pybroker into the project's own
site-packages, where it comes first (checked by its path). That keeps the
test off the network and takes seconds, where a full install (build
isolation, every dependency downloaded) takes a minute and needs the package
index; what it proves is the same: the installed package, not the source
tree, passes the README's examples. (CI's .ci/wheel-smoke builds the wheel
with build isolation and installs it into a clean venv.)
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import sysconfig
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers.procs import START_TIMEOUT, child_env, read_json_lines
from helpers.readme import blocks, section, with_url

REPO = Path(__file__).resolve().parents[1]
#: Bound on one command in the project (an install, a pytest run, a script).
TIMEOUT = 180.0
#: What a copy of the source tree leaves out.
NOT_SOURCE = shutil.ignore_patterns(
    ".git", ".venv", "venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
    ".mypy_cache", "pybroker-data", "fuzz-corpus",
)


def python_blocks(text: str) -> list[str]:
    return blocks(text, "python")


class Project:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.venv = root / "venv"
        self.python = self.venv / "bin" / "python"

    def run(self, *args: str, cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(self.python), *args],
            cwd=cwd or self.root,
            env=child_env({"PYTHONDONTWRITEBYTECODE": "1"}),
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
        if check:
            assert result.returncode == 0, f"{args} failed:\n{result.stdout}\n{result.stderr}"
        return result


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Project:
    """A fresh project outside the repository with pybroker pip-installed."""
    root = tmp_path_factory.mktemp("readme-project")
    assert REPO not in root.parents
    source = root / "pybroker-source"
    shutil.copytree(REPO, source, ignore=NOT_SOURCE)  # pip builds in the tree it is given
    made = Project(root)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(made.venv)], check=True, timeout=TIMEOUT)
    site = Path(
        subprocess.run(
            [str(made.python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True, text=True, check=True, timeout=TIMEOUT,
        ).stdout.strip()
    )
    ours = sysconfig.get_paths()["purelib"]
    (site / "outer-venv.pth").write_text(ours + "\n")
    made.run(
        "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--no-build-isolation",
        "--ignore-installed", str(source),
    )
    shutil.rmtree(source)
    # The installed copy is the one imported, not the source tree.
    where = made.run("-c", "import pybroker, pybroker.sync; print(pybroker.__file__)").stdout.strip()
    assert Path(where).is_relative_to(site), where
    return made


@pytest.fixture(scope="module")
def broker_url(project: Project) -> Iterator[str]:
    """``pybroker serve`` of the project's installation, on a free port."""
    log_path = project.root / "broker.log"
    script = project.venv / "bin" / "pybroker"
    data = project.root / "data"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [str(script), "serve", "--port", "0", "--no-http", "--data-dir", str(data), "--log-format", "json"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log, env=child_env(),
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT
        url = None
        while url is None and time.monotonic() < deadline and proc.poll() is None:
            for record in read_json_lines(log_path):
                if record.get("event") == "listening":
                    url = str(record["url"])
            time.sleep(0.02)  # the log file has no event to wait on
        assert url, log_path.read_text(errors="replace")
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)


def test_the_test_examples_pass_in_a_fresh_project(project: Project) -> None:
    tests = project.root / "tests-project"
    tests.mkdir()
    written = []
    for block in python_blocks(section("In your tests")):
        first, _, _ = block.partition("\n")
        name = re.fullmatch(r"# (\S+\.py)", first.strip())
        assert name, f"a block in 'In your tests' does not start with '# FILE.py': {first!r}"
        (tests / name.group(1)).write_text(block, encoding="utf-8")
        written.append(name.group(1))
    assert "conftest.py" in written and len(written) >= 4, written
    result = project.run("-m", "pytest", "-q", "-p", "no:cacheprovider", cwd=tests, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    expected = sum(block.count("\ndef test_") + block.count("\nasync def test_") for block in python_blocks(section("In your tests")))
    assert expected == 3
    assert re.search(rf"^{expected} passed", output, re.MULTILINE), output


def next_offset(url: str, topic: str) -> int:
    """Where ``topic`` will store its next message (0 if it does not exist)."""
    import pybroker.sync

    with pybroker.sync.connect(url) as c:
        found = [t for t in c.topics(topic) if t.topic == topic]
    return found[0].next_offset if found else 0


def run_example(project: Project, url: str, title: str, name: str) -> str:
    """Run the section's first Python block as a script; its output.

    Its callbacks may print from other threads while the main thread prints,
    and print() writes its pieces one by one, so lines can interleave: the
    checks look for whole pieces (one argument of one print) and at what the
    broker stored, not at whole lines."""
    code = with_url(python_blocks(section(title))[0], url)
    script = project.root / name
    script.write_text(code, encoding="utf-8")
    before = next_offset(url, "orders.eu.created")
    out = project.run(str(script)).stdout
    # One publish and 10,000 sends, all acknowledged before the script ended.
    assert next_offset(url, "orders.eu.created") == before + 10_001
    assert "stored at offset" in out
    return out


def test_the_trio_example_runs(project: Project, broker_url: str) -> None:
    out = run_example(project, broker_url, "From Python", "trio_example.py")
    # The replay from the earliest message, up to offset 10: no other task prints.
    assert [line for line in out.splitlines() if re.match(r"^\d+ b'", line)][-1].startswith("10 ")


def test_the_blocking_example_runs(project: Project, broker_url: str) -> None:
    out = run_example(project, broker_url, "Without an event loop: threads, Flask, FastAPI", "sync_example.py")
    assert "b'hi'" in out  # the reply to the request
    assert next_offset(broker_url, "svc.echo") >= 1


def test_the_flask_example_serves(project: Project, broker_url: str) -> None:
    blocks = python_blocks(section("Without an event loop: threads, Flask, FastAPI"))
    (app_code,) = [b for b in blocks if "from flask import" in b]
    (project.root / "flask_app.py").write_text(with_url(app_code, broker_url), encoding="utf-8")
    driver = textwrap.dedent(
        """
        import json
        import flask_app
        http = flask_app.app.test_client()
        answers = [http.post("/orders", data=b"order %d" % i).get_json() for i in range(3)]
        flask_app.broker.close()
        print(json.dumps(answers))
        """
    )
    out = project.run("-c", driver).stdout.strip().splitlines()[-1]
    offsets = [answer["offset"] for answer in json.loads(out)]
    assert offsets == sorted(offsets) and len(set(offsets)) == 3


def test_the_fastapi_example_serves(project: Project, broker_url: str) -> None:
    blocks = python_blocks(section("Without an event loop: threads, Flask, FastAPI"))
    (app_code,) = [b for b in blocks if "from fastapi import" in b]
    (project.root / "fastapi_app.py").write_text(with_url(app_code, broker_url), encoding="utf-8")
    driver = textwrap.dedent(
        """
        import asyncio, json
        import httpx
        import fastapi_app

        async def main():
            transport = httpx.ASGITransport(app=fastapi_app.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://app") as http:
                a = await http.post("/orders", json={"id": 1})
                b = await http.post("/orders/raw", content=b"raw order")
                return [a.json(), b.json()]

        answers = asyncio.run(main())
        fastapi_app.broker.close()
        print(json.dumps(answers))
        """
    )
    out = project.run("-c", driver).stdout.strip().splitlines()[-1]
    first, second = json.loads(out)
    assert second["offset"] == first["offset"] + 1


def test_the_cluster_example_serves(project: Project, cluster_servers: tuple[str, object, str]) -> None:
    """The two ``pybroker serve --cluster`` commands of "Cluster mode", run
    from the project (the same directory for both, as a reader would) on a
    real etcd and SeaweedFS. The changes made to them: etcd's and the
    store's addresses become the test servers', and the ports 0 (free
    ones); the nodes' addresses are read from their logs. A message
    published through one node is read through the other."""
    commands = [line for line in blocks(section("Cluster mode"), "sh")[0].splitlines() if line.strip()]
    assert len(commands) == 2 and all(c.startswith(".venv/bin/pybroker serve ") for c in commands), commands
    etcd_url, _etcd, s3_url = cluster_servers  # (conftest.py: the suite's shared servers)
    procs: list[subprocess.Popen[bytes]] = []
    logs = [project.root / f"cluster-{i}.log" for i in range(2)]
    try:
        for command, log_path in zip(commands, logs, strict=True):
            for port in ("7420", "7430", "7431"):
                command = command.replace(f" {port}", " 0")
            command = command.replace("127.0.0.1:2379", etcd_url.removeprefix("http://"))
            command = command.replace("127.0.0.1:8333", s3_url.removeprefix("http://"))
            args = shlex.split(command)
            args[0] = str(project.venv / "bin" / "pybroker")
            with open(log_path, "wb") as log:
                procs.append(
                    subprocess.Popen(
                        args, cwd=project.root, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
                        env=child_env(),
                    )  # fmt: skip
                )
        urls = [listening_url(log_path, proc) for log_path, proc in zip(logs, procs, strict=True)]
        script = project.root / "cluster_check.py"
        script.write_text(
            textwrap.dedent(
                f"""
                import pybroker.sync
                with pybroker.sync.connect({urls[0]!r}, reconnect=True) as pub:
                    ack = pub.publish("readme.cluster", b"across nodes")
                with pybroker.sync.connect({urls[1]!r}, reconnect=True) as sub:
                    with sub.subscribe("readme.cluster", start="earliest") as messages:
                        message = messages.get(timeout=60)
                print(ack.offset, message.offset, message.payload.decode())
                """
            ),
            encoding="utf-8",
        )
        assert project.run(str(script)).stdout.split() == ["0", "0", "across", "nodes"]
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def listening_url(log_path: Path, proc: subprocess.Popen[bytes]) -> str:
    """The ``pybroker://`` address a node's (text) log says it listens on."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline and proc.poll() is None:
        found = re.search(r"pybroker://127\.0\.0\.1:(\d+)", log_path.read_text(errors="replace"))
        if found:
            return found.group(0)
        time.sleep(0.02)  # the log file has no event to wait on
    raise AssertionError(log_path.read_text(errors="replace"))


def test_readme_names_every_fixture_the_plugin_has() -> None:
    import pybroker.server.pytest_plugin as plugin

    fixtures = {name for name in dir(plugin) if name.startswith("pybroker_")}
    text = section("In your tests")
    assert fixtures == {"pybroker_server", "pybroker_client", "pybroker_server_thread", "pybroker_url", "pybroker_sync_client"}
    for name in fixtures:
        assert f"`{name}`" in text, name


def test_the_project_is_outside_the_repository(project: Project) -> None:
    assert not project.root.resolve().is_relative_to(REPO)
    assert os.path.isdir(project.venv)
