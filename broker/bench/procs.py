"""Processes of a benchmark run: the broker or relay under test, the load
processes, pinning, and what /proc says about them (RSS, CPU time)."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

#: The directory holding the broker and client packages: children import the
#: same code as this process, installed or run from a source tree.
_ROOT = str(Path(__file__).resolve().parents[2])


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_ROOT, env.get("PYTHONPATH", "")) if p)
    env.pop("PYBROKER_URL", None)
    return env


#: Seconds a broker or relay may take to start listening.
START_TIMEOUT = 30.0
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class Target:
    """What the load is aimed at: a broker or the relay, ours or given by URL."""

    def __init__(self, kind: str, url: str, proc: subprocess.Popen[bytes] | None, pid: int | None, log: Path | None) -> None:
        self.kind = kind  # "pybroker" or "relay"
        self.url = url
        self.proc = proc
        self.pid = pid
        self.log = log

    def alive(self) -> bool:
        return self.proc is None or self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is None:
            return
        stop_process(self.proc, 15.0)


def stop_process(proc: subprocess.Popen[bytes], grace: float) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _pin(pid: int, cpus: list[int] | None) -> None:
    if cpus:
        try:
            os.sched_setaffinity(pid, set(cpus))
        except OSError:
            pass  # the process is gone already; its results will say so


def start_broker(workdir: Path, extra: list[str], cpus: list[int] | None, python: str = sys.executable) -> Target:
    """``pybroker serve --port 0`` on a fresh data directory under workdir,
    run by ``python`` (this one by default)."""
    log_path = workdir / "broker.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [python, "-m", "pybroker", "serve", "--port", "0",
             "--data-dir", str(workdir / "data"), "--log-format", "json", *extra],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log, env=child_env(),
        )
    _pin(proc.pid, cpus)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        for line in log_path.read_text(errors="replace").splitlines():
            if '"listening"' in line:
                return Target("pybroker", json.loads(line)["url"], proc, proc.pid, log_path)
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    stop_process(proc, 5)
    raise RuntimeError(f"the broker did not start:\n{tail(log_path)}")


def start_relay(workdir: Path, cpus: list[int] | None) -> Target:
    log_path = workdir / "relay.log"
    out_path = workdir / "relay.out"
    with open(log_path, "wb") as log, open(out_path, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pybroker.server.bench.relay", "--port", "0"],
            stdin=subprocess.DEVNULL, stdout=out, stderr=log, env=child_env(),
        )
    _pin(proc.pid, cpus)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        text = out_path.read_text(errors="replace").strip()
        if text:
            return Target("relay", json.loads(text.splitlines()[0])["url"], proc, proc.pid, log_path)
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    stop_process(proc, 5)
    raise RuntimeError(f"the relay did not start:\n{tail(log_path)}")


class Worker:
    """One load process (``python -m pybroker.server.bench.worker SPEC``)."""

    def __init__(self, name: str, spec: dict[str, Any], workdir: Path, cpus: list[int] | None) -> None:
        self.name = name
        self.out_path = workdir / f"{name}.out"
        self.err_path = workdir / f"{name}.err"
        spec = dict(spec, cpus=cpus)
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pybroker.server.bench.worker", json.dumps(spec)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=child_env(),
            )
        _pin(self.proc.pid, cpus)

    def running(self) -> bool:
        return self.proc.poll() is None

    def result(self, timeout: float) -> dict[str, Any]:
        """Its JSON result; kills it if it does not finish within timeout."""
        try:
            self.proc.wait(timeout=max(0.1, timeout))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
            return {"error": f"{self.name} did not finish in time (killed)"}
        lines = self.out_path.read_text(errors="replace").strip().splitlines()
        if self.proc.returncode != 0 or not lines:
            return {"error": f"{self.name} exited with {self.proc.returncode}: {tail(self.err_path)}"}
        result: dict[str, Any] = json.loads(lines[-1])
        return result

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# -- /proc -------------------------------------------------------------------


def rss_kb(pid: int | None, field: str = "VmRSS") -> int | None:
    """Resident set size (or VmHWM, its peak) of a process, in KiB."""
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def cpu_seconds(pid: int | None) -> float | None:
    """User plus system CPU time of a process (all its threads), in seconds."""
    if pid is None:
        return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def raise_nofile(wanted: int) -> tuple[int, int, bool]:
    """Raise the soft RLIMIT_NOFILE to the hard limit (children inherit it).
    Returns (soft, hard, enough for ``wanted``)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, wanted)
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft, hard, soft >= wanted
