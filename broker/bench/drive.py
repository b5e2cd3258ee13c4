"""One measured run: subscribers first, then the publisher, watched to the end.

``drive`` starts the subscriber processes, waits until every connection has
its SUBACK, starts the publisher, shows progress on stderr while it runs,
stops everything if it stalls or overruns, and then checks what every
subscriber connection received: every offset of the run, in order, once.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import attrs

from . import board as b
from .procs import Target, Worker, cpu_seconds

#: Seconds every subscriber connection has to get its SUBACK.
READY_TIMEOUT = 60.0
#: Shortest window (s) for which CPU use is reported.
MIN_CPU_WINDOW = 1.0
#: Seconds a worker has to report after it was told to finish.
REPORT_TIMEOUT = 30.0


class Progress:
    """A status line on stderr: rewritten in place on a terminal, else a line
    every few seconds (logs and tests)."""

    def __init__(self, enabled: bool = True, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = self.stream.isatty()
        self._last = 0.0
        self._width = 0

    def show(self, text: str, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if self.tty:
            if force or now - self._last >= 0.2:
                self.stream.write("\r" + text.ljust(self._width))
                self._width = len(text)
                self.stream.flush()
                self._last = now
        elif force or now - self._last >= 2.0:
            self.stream.write(text + "\n")
            self.stream.flush()
            self._last = now

    def note(self, text: str) -> None:
        """A line that stays."""
        if not self.enabled:
            return
        if self.tty and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self._width = 0
        self.stream.write(text + "\n")
        self.stream.flush()


@attrs.define
class Load:
    """What one run puts on a target."""

    target: Target
    label: str  # for progress lines
    topic: str
    subscribers: int
    #: Every subscriber must receive offsets 0..messages-1; 0: as many as the
    #: publisher reports it sent (it publishes for the duration in its spec).
    messages: int
    mode: str  # "raw" or "decode"
    sub_procs: int
    publisher: dict[str, Any]  # the publisher's spec: role, publisher kind, sizes...
    subscriber_extra: dict[str, Any] = attrs.field(factory=dict)  # latency, stall
    load_cpus: list[int] | None = None
    timeout: float = 300.0
    stall_timeout: float = 60.0
    #: Called about every 50 ms while the load runs: (board, seconds since
    #: the publisher started, publisher done, slots of finished subscribers).
    on_tick: Callable[[b.Board, float, bool, set[int]], None] | None = None


@attrs.define
class Outcome:
    publisher: dict[str, Any]
    connections: list[dict[str, Any]]
    problems: list[str]
    cpu_cores: float | None
    #: CPU of all load processes together over the same window (cores).
    load_cpu_cores: float | None
    active_seconds: float
    sample_files: list[Path]

    @property
    def verified(self) -> bool:
        return not self.problems


def drive(load: Load, workdir: Path, progress: Progress) -> Outcome:
    workdir.mkdir(parents=True, exist_ok=True)
    n = load.subscribers
    board = b.Board(workdir / "board", 2 + n, create=True)
    deadline = time.time() + load.timeout
    common = {"url": load.target.url, "target": load.target.kind, "topic": load.topic, "board": str(board.path),
              "board_slots": board.slots, "deadline": deadline, "messages": load.messages}
    slots = list(range(2, 2 + n))
    procs = max(1, min(load.sub_procs, n))
    groups = [slots[i::procs] for i in range(procs)]
    subs: list[Worker] = []
    sample_files: list[Path] = []
    problems: list[str] = []
    for i, group in enumerate(g for g in groups if g):
        spec = dict(common, role="subscribe", slots=group, mode=load.mode, **load.subscriber_extra)
        if spec.get("latency"):
            spec["samples"] = str(workdir / f"samples-{i}.bin")
            sample_files.append(Path(spec["samples"]))
        subs.append(Worker(f"sub-{i}", spec, workdir, load.load_cpus))
    pub: Worker | None = None
    cpu: tuple[float, float] | None = None
    load_cpu: float | None = None
    t_start = t_end = 0.0
    try:
        # Every subscription is in place before the first message goes out.
        ready_by = time.monotonic() + READY_TIMEOUT
        while True:
            ready = sum(board.get(s, b.STATE) >= b.READY for s in slots)
            progress.show(f"{load.label}: {ready}/{n} subscribed")
            if ready == n:
                break
            if time.monotonic() > ready_by or not all(w.running() for w in subs) or not load.target.alive():
                problems.append(f"only {ready} of {n} subscribers got their SUBACK within {READY_TIMEOUT:.0f} s")
                break
            time.sleep(0.02)
        if not problems:
            pub = Worker("pub", dict(common, slot=1, **load.publisher), workdir, load.load_cpus)
            t_start, t_end, cpu, load_cpu = _watch(load, board, [pub, *subs], slots, deadline, progress, problems)
    finally:
        board.set(b.CONTROL, b.STOP, 1)  # anyone still running stops now
        pub_result = pub.result(REPORT_TIMEOUT) if pub is not None else {"error": "not started"}
        results = [w.result(REPORT_TIMEOUT) for w in subs]
        for w in subs:
            w.kill()
        board.close()
    connections = _connections(results, slots, groups, problems)
    if pub_result.get("error"):
        problems.append(f"publisher: {pub_result['error']}")
    if pub_result.get("in_order") is False:
        problems.append("publisher: acknowledgements out of order, or their offsets not contiguous")
    for c in connections:
        if not c["complete"]:
            problems.append(_lost(c, load.messages or int(pub_result.get("sent") or 0)))
    seconds = t_end - t_start
    # CPU time comes in 10 ms ticks and the window is watched every 50 ms:
    # below a second the quotient says little, so none is given.
    measurable = seconds >= MIN_CPU_WINDOW
    cores = (cpu[1] - cpu[0]) / seconds if cpu is not None and measurable else None
    load_cores = load_cpu / seconds if load_cpu is not None and measurable else None
    return Outcome(pub_result, connections, problems, cores, load_cores, seconds, sample_files)


def _load_cpu(workers: list[Worker]) -> list[float | None]:
    return [cpu_seconds(w.proc.pid) for w in workers]


def _watch(
    load: Load, board: b.Board, workers: list[Worker], slots: list[int], deadline: float,
    progress: Progress, problems: list[str],
) -> tuple[float, float, tuple[float, float] | None, float | None]:
    """Watch the run; return (start, end, broker CPU seconds at both, load
    CPU seconds between them), the window being from the publisher's first
    send to the last subscriber's last message."""
    pid = load.target.pid
    pub = workers[0]
    n = len(slots)
    cpu0 = cpu1 = None
    load0: list[float | None] = []  # each load process's CPU seconds at the start
    latest: list[float | None] = []  # ... when last seen (it may exit before the end)
    load1: list[float | None] = []
    t_start = t_end = time.monotonic()
    started = False
    last_total, last_change = -1, time.monotonic()
    while True:
        now = time.monotonic()
        state = board.get(1, b.STATE)
        if not started and state >= b.RUNNING:
            started, t_start, cpu0 = True, now, cpu_seconds(pid)
            load0 = latest = _load_cpu(workers)
        if started and not load1:
            latest = [c if c is not None else old for c, old in zip(_load_cpu(workers), latest)]
        finished = {s for s in slots if board.get(s, b.STATE) >= b.DONE}
        pub_done = not pub.running()
        if load.on_tick is not None and started:
            load.on_tick(board, now - t_start, pub_done, finished)
        delivered = sum(board.get(s, b.COUNT) for s in slots)
        sent, acked = board.get(1, b.COUNT), board.get(1, b.ACKED)
        total = (load.messages or sent) * n
        receiving = (
            f"; delivered {delivered:,} of {total:,} ({100 * delivered / max(1, total):.0f} %), "
            f"{len(finished)}/{n} subscribers done" if n else ""
        )
        of = f" of {load.messages:,}" if load.messages else ""
        progress.show(
            f"{load.label}: sent {sent:,}{of}, acked {acked:,}{receiving}, "
            f"{now - t_start if started else 0:.1f} s"
        )
        everyone = len(finished) == n and (n > 0 or pub_done)
        if everyone and not load1:
            t_end, cpu1, load1 = now, cpu_seconds(pid), latest
        if everyone and pub_done:
            break
        if pub_done and not started:
            problems.append("the publisher exited before it started publishing")
            break
        progress_now = delivered + sent + acked
        if progress_now != last_total:
            last_total, last_change = progress_now, now
        elif now - last_change > load.stall_timeout:
            problems.append(f"no progress for {load.stall_timeout:.0f} s: stopped")
            break
        if time.time() > deadline:
            problems.append(f"not finished within {load.timeout:.0f} s: stopped")
            break
        if not load.target.alive():
            problems.append(f"the {load.target.kind} exited during the run")
            break
        time.sleep(0.05)
    if not load1:
        t_end, cpu1, load1 = time.monotonic(), cpu_seconds(pid), latest
    cpu = (cpu0, cpu1) if cpu0 is not None and cpu1 is not None else None
    pairs = list(zip(load0, load1))
    used = None
    if pairs and all(a is not None and z is not None for a, z in pairs):
        used = sum(z - a for a, z in pairs if a is not None and z is not None)
    return t_start, t_end, cpu, used


def _connections(
    results: list[dict[str, Any]], slots: list[int], groups: list[list[int]], problems: list[str]
) -> list[dict[str, Any]]:
    connections: list[dict[str, Any]] = []
    for group, result in zip((g for g in groups if g), results):
        if "connections" in result:
            connections.extend(result["connections"])
        else:
            problems.append(
                f"subscriber connections {_names(group, slots)}: no result ({result.get('error', '?')})"
            )
    for c in connections:
        c["subscriber"] = slots.index(c["slot"]) + 1
    return sorted(connections, key=lambda c: int(c["subscriber"]))


def _names(group: list[int], slots: list[int]) -> str:
    return ", ".join(str(slots.index(s) + 1) for s in group)


def _lost(c: dict[str, Any], expected: int) -> str:
    parts = [f"subscriber {c['subscriber']}: received {c['received']:,} of {expected:,}"]
    if c["missing"]:
        spans = ", ".join(f"{a}..{z}" if a != z else f"{a}" for a, z in c["gaps"])
        more = " and more" if len(c["gaps"]) >= 10 else ""
        parts.append(f"lost {c['missing']:,} (offsets {spans}{more})")
    if c["duplicates"]:
        parts.append(f"{c['duplicates']:,} duplicated or out of order")
    if c.get("error"):
        parts.append(str(c["error"]))
    return "; ".join(parts)


def rate(count: float, seconds: float) -> float:
    return count / seconds if seconds > 0 else 0.0


def delivery_rate(outcome: Outcome) -> tuple[int, float, float]:
    """(messages delivered, seconds from the first send to the last delivery, rate)."""
    delivered = sum(int(c["received"]) for c in outcome.connections)
    start = float(outcome.publisher.get("start") or 0.0)
    ends = [float(c["last"]) for c in outcome.connections if c["last"]]
    seconds = max(ends) - start if ends and start else 0.0
    return delivered, seconds, rate(delivered, seconds)


def unique_topic(kind: str) -> str:
    return f"bench.{kind}.{os.getpid()}.{time.time_ns()}"
