"""What every scenario of one `pybroker bench` invocation shares: where its
files go, which cores run what, and how targets are started and stopped."""

from __future__ import annotations

import itertools
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import attrs

from .drive import Progress
from .procs import Target, rss_kb, start_broker, start_relay


@attrs.define
class Context:
    workdir: Path
    progress: Progress
    #: A broker to use instead of starting one (and its pid, for RSS and CPU).
    url: str | None = None
    broker_pid: int | None = None
    #: Extra `pybroker serve` arguments for the brokers we start.
    broker_args: list[str] = attrs.field(factory=list)
    #: The Python that runs the brokers it starts.
    broker_python: str = sys.executable
    #: Cores for the broker (or relay) and for the load; None: not pinned.
    target_cpus: list[int] | None = None
    load_cpus: list[int] | None = None
    timeout: float = 300.0
    #: The fsync policy of a broker started without --fsync.
    fsync_default: str = "always"
    _ids: Iterator[int] = attrs.field(factory=lambda: itertools.count(1))

    def fresh_dir(self, name: str) -> Path:
        path = self.workdir / f"{next(self._ids):03d}-{name}"
        path.mkdir(parents=True)
        return path

    @property
    def pinning(self) -> str:
        if self.target_cpus is None:
            return "not pinned"
        target = "broker/relay" if self.url is None else "relay (the broker at --url is not pinned)"
        return f"pinned: {target} on CPU {_cpus(self.target_cpus)}, load processes on CPU {_cpus(self.load_cpus)}"

    @contextmanager
    def target(self, kind: str, name: str, extra: list[str] | None = None) -> Iterator[Target]:
        """A broker (ours, or the one at --url) or a relay, for one run."""
        workdir = self.fresh_dir(name)
        if kind == "relay":
            target = start_relay(workdir, self.target_cpus)
        elif self.url is not None:
            target = Target("pybroker", self.url, None, self.broker_pid, None)
        else:
            target = start_broker(
                workdir, [*self.broker_args, *(extra or [])], self.target_cpus, self.broker_python
            )
        try:
            yield target
        finally:
            target.stop()
            shutil.rmtree(workdir / "data", ignore_errors=True)  # rows add up on disk otherwise

    def peak_rss_kb(self, target: Target) -> int | None:
        return rss_kb(target.pid, "VmHWM")


def _cpus(cpus: list[int] | None) -> str:
    return ",".join(str(c) for c in cpus or [])
