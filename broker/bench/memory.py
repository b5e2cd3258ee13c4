"""Memory and scale: broker RSS idle, with many idle subscriber connections,
and during a long fan-out run while one subscriber of N is stalled.

RSS is VmRSS from /proc/PID/status. Idle connections are opened from a few
load processes with plain sockets (HELLO, SUBSCRIBE, wait for SUBACK) and
held open while the broker's RSS is read. In the stalled run one subscriber
stops reading after its first batch; the broker must keep its memory
bounded (the stalled subscription is served from the log later) while the
others go on at full speed. When the publisher and the others are done the
stalled one resumes and must catch up on everything from disk, in order.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from . import board as b
from .context import Context
from .drive import Load, delivery_rate, drive, unique_topic
from .fanout import publisher_spec
from .procs import Target, Worker, raise_nofile, rss_kb
from .report import count, mib, table

#: Seconds for RSS to settle after connections open or close.
SETTLE = 1.0
#: Extra seconds before the RSS reading after closing the idle connections.
AFTER_CLOSE = 2.0
#: Seconds every idle connection has to get its SUBACK.
OPEN_TIMEOUT = 120.0


def _settled_rss(pid: int | None) -> int | None:
    time.sleep(SETTLE)
    return rss_kb(pid)


def idle_connections(ctx: Context, args: argparse.Namespace, target: Target, workdir: Path) -> list[dict[str, Any]]:
    workdir.mkdir(parents=True, exist_ok=True)
    levels = sorted(args.connections)
    procs = max(1, args.conn_procs)
    board = b.Board(workdir / "board", 1 + procs * len(levels), create=True)
    deadline = time.time() + ctx.timeout + OPEN_TIMEOUT
    workers: list[tuple[int, Worker]] = []
    rows: list[dict[str, Any]] = [{"state": "idle", "connections": 0, "rss_kb": _settled_rss(target.pid)}]
    idle_rss = rows[0]["rss_kb"]
    opened = 0
    try:
        for level in levels:
            want = level - opened
            slots = []
            for i in range(procs):
                share = want // procs + (1 if i < want % procs else 0)
                if share:
                    slot = 1 + len(workers)
                    spec = {"role": "idle", "url": target.url, "board": str(board.path), "board_slots": board.slots,
                            "slot": slot, "count": share, "pattern": "bench.idle", "deadline": deadline}
                    workers.append((slot, Worker(f"idle-{slot}", spec, workdir, ctx.load_cpus)))
                    slots.append(slot)
            by = time.monotonic() + OPEN_TIMEOUT
            while time.monotonic() < by:
                now_open = sum(board.get(s, b.COUNT) for s, _ in workers)
                ctx.progress.show(f"memory: {now_open:,} of {level:,} idle subscriber connections open")
                if all(board.get(s, b.STATE) in (b.READY, b.FAILED) for s in slots):
                    break
                if not all(w.running() for s, w in workers if s in slots) or not target.alive():
                    break  # a load process died: its error is collected below
                time.sleep(0.05)
            opened = sum(board.get(s, b.COUNT) for s, _ in workers)
            failed = [s for s in slots if board.get(s, b.STATE) != b.READY]
            rss = _settled_rss(target.pid)
            row: dict[str, Any] = {"state": "idle subscriber connections", "connections": opened, "wanted": level,
                                   "rss_kb": rss}
            if rss is not None and idle_rss is not None and opened:
                row["per_connection_kb"] = (rss - idle_rss) / opened
            if opened < level or failed:
                row["problem"] = f"opened {opened:,} of {level:,}: " + "; ".join(
                    _errors([w for s, w in workers if s in failed]) or ["load processes stopped"]
                )
            rows.append(row)
            ctx.progress.note(f"memory: {opened:,} idle subscriber connections: broker RSS {mib(rss)} MiB")
        board.set(b.CONTROL, b.CLOSE, 1)
        for _, w in workers:
            w.result(30)
        time.sleep(AFTER_CLOSE)  # sessions linger up to a second after the peer closes
        rows.append({"state": "after closing them", "connections": 0, "rss_kb": _settled_rss(target.pid)})
    finally:
        board.set(b.CONTROL, b.STOP, 1)
        for _, w in workers:
            w.kill()
        board.close()
    return rows


def _errors(workers: list[Worker]) -> list[str]:
    """What the failed idle-connection processes said (they exit once told to close)."""
    out = []
    for w in workers:
        if w.running():
            text = "still running"
            lines = w.err_path.read_text(errors="replace").strip().splitlines() if w.err_path.exists() else []
            out.append(f"{w.name}: {lines[-1] if lines else text}")
        else:
            out.append(f"{w.name}: {w.result(5).get('error', '?')}")
    return sorted(set(out))


def stalled_run(ctx: Context, args: argparse.Namespace) -> dict[str, Any]:
    name = "memory-stalled"
    workdir = ctx.workdir / name
    samples: list[tuple[float, int | None]] = []
    marks: dict[str, float] = {}
    # The stalled subscriber sends nothing: no idle timeout may close it
    # mid-run (a long one, not 0, so the idle watchdog's memory is counted).
    with ctx.target("pybroker", name, ["--idle-timeout", "3600"]) as target:
        stalled_slot = 2  # subscriber 1
        before = _settled_rss(target.pid)
        next_sample = [0.0]

        def on_tick(board: b.Board, elapsed: float, pub_done: bool, finished: set[int]) -> None:
            if elapsed >= next_sample[0]:
                samples.append((round(elapsed, 3), rss_kb(target.pid)))
                next_sample[0] += args.sample_interval
            if "stalled" not in marks and board.get(stalled_slot, b.EXTRA):
                marks["stalled"] = elapsed
            others = set(range(3, 2 + args.stall_subscribers))
            if "resumed" not in marks and pub_done and others <= finished:
                marks["resumed"] = elapsed
                board.set(b.CONTROL, b.RESUME, 1)
            if "caught_up" not in marks and stalled_slot in finished:
                marks["caught_up"] = elapsed

        load = Load(
            target=target,
            label=f"memory: fan-out to {args.stall_subscribers}, subscriber 1 stalled",
            topic=unique_topic("stalled"),
            subscribers=args.stall_subscribers,
            messages=args.stall_messages,
            mode="raw",
            sub_procs=args.stall_subscribers,
            publisher=publisher_spec(args, args.size),
            subscriber_extra={"stall_slot": stalled_slot, "stall_after": 1},
            load_cpus=ctx.load_cpus,
            timeout=ctx.timeout,
            on_tick=on_tick,
        )
        outcome = drive(load, workdir, ctx.progress)
        peak = ctx.peak_rss_kb(target)
        after = rss_kb(target.pid)
    others = [c for c in outcome.connections if c["slot"] != stalled_slot]
    stalled = [c for c in outcome.connections if c["slot"] == stalled_slot]
    _, _, rate_all = delivery_rate(outcome)
    pub = outcome.publisher
    others_end = max((float(c["last"]) for c in others if c["last"]), default=0.0)
    others_delivered = sum(int(c["received"]) for c in others)
    start = float(pub.get("start") or 0.0)
    rss_values = [r for _, r in samples if r is not None]
    result = {
        "subscribers": args.stall_subscribers,
        "messages": args.stall_messages,
        "size": args.size,
        "published_bytes": args.stall_messages * args.size,
        "rss_before_kb": before,
        "rss_max_sampled_kb": max(rss_values) if rss_values else None,
        "rss_peak_kb": peak,
        "rss_after_kb": after,
        "samples": samples,
        "sample_interval": args.sample_interval,
        "marks": marks,
        "others_delivered_per_s": others_delivered / (others_end - start) if others_end > start else 0.0,
        "delivered_per_s_all": rate_all,
        "stalled_received": stalled[0]["received"] if stalled else 0,
        "catch_up_seconds": (marks["caught_up"] - marks["resumed"]) if {"caught_up", "resumed"} <= set(marks) else None,
        "verified": outcome.verified,
        "problems": outcome.problems,
    }
    ctx.progress.note(
        f"memory: stalled run: broker RSS before {mib(before)} MiB, max sampled {mib(result['rss_max_sampled_kb'])} MiB, "
        f"peak (VmHWM) {mib(peak)} MiB; {'verified' if outcome.verified else 'INCOMPLETE'}"
    )
    return result


def run(ctx: Context, args: argparse.Namespace) -> dict[str, Any]:
    if ctx.url is not None and ctx.broker_pid is None:
        raise SystemExit("pybroker bench memory: with --url, give --broker-pid too (RSS is read from /proc)")
    wanted = max(args.connections, default=0) + 1000
    soft, hard, enough = raise_nofile(wanted)
    result: dict[str, Any] = {"nofile_soft": soft, "nofile_hard": hard}
    if not enough:
        result["nofile_note"] = (
            f"RLIMIT_NOFILE is {soft} (hard {hard}): the broker needs a descriptor per connection, "
            f"so {max(args.connections):,} connections may not all open"
        )
        ctx.progress.note("memory: " + result["nofile_note"])
    # Idle connections that never answer PING, more than the default
    # connection limit allows: lift both limits for this run (a long idle
    # timeout, not 0, so that the idle watchdog's memory is counted).
    limits = ["--idle-timeout", "3600", "--max-connections", str(wanted)]
    with ctx.target("pybroker", "memory-idle", limits) as target:
        result["idle"] = idle_connections(ctx, args, target, ctx.workdir / "memory-idle-load")
    if args.stall_messages:
        result["stalled"] = stalled_run(ctx, args)
    return result


def render(result: dict[str, Any]) -> str:
    out = []
    lines = []
    for r in result["idle"]:
        per = r.get("per_connection_kb")
        lines.append([r["state"], count(r["connections"]), mib(r["rss_kb"]),
                      f"{per:,.1f}" if per is not None else "-", r.get("problem", "")])
    out.append("Memory: broker RSS (VmRSS), idle and with idle subscriber connections (HELLO + SUBSCRIBE each)")
    out.append(table(["state", "connections", "RSS MiB", "KiB per connection", "note"], lines))
    if "nofile_note" in result:
        out.append(result["nofile_note"])
    s = result.get("stalled")
    if s:
        samples = ", ".join(f"{t:.1f}s {mib(r)}" for t, r in _thin(s["samples"], 24))
        m = s["marks"]
        out.append(
            f"\nStalled subscriber: {s['messages']:,} x {s['size']} B to {s['subscribers']} subscribers "
            f"({s['published_bytes'] / 2**20:,.0f} MiB of payload), subscriber 1 stops reading after its first batch"
            + (f" (stalled at {m['stalled']:.1f} s)" if "stalled" in m else "")
        )
        out.append(
            f"  broker RSS MiB: before {mib(s['rss_before_kb'])}, max sampled {mib(s['rss_max_sampled_kb'])}, "
            f"peak VmHWM {mib(s['rss_peak_kb'])}, at the end {mib(s['rss_after_kb'])}"
        )
        out.append(f"  the other {s['subscribers'] - 1}: {count(s['others_delivered_per_s'])} delivered msg/s together")
        if s["catch_up_seconds"] is not None:
            out.append(
                f"  resumed at {m['resumed']:.1f} s, caught up from the log in {s['catch_up_seconds']:.1f} s "
                f"({s['stalled_received']:,} messages)"
            )
        out.append(f"  RSS samples (s, MiB): {samples}")
        out.append(f"  delivery: {'verified' if s['verified'] else 'INCOMPLETE'}")
    return "\n".join(out)


def _thin(samples: list[tuple[float, int | None]], most: int) -> list[tuple[float, int | None]]:
    if len(samples) <= most:
        return samples
    step = len(samples) / most
    picked = [samples[int(i * step)] for i in range(most)]
    return picked + [samples[-1]]


def claims(result: dict[str, Any]) -> list[str]:
    opened = max((int(r["connections"]) for r in result["idle"]), default=0)
    out = [f"all {opened:,} idle subscriber connections got their SUBACK"]
    if result.get("stalled"):
        out.append("in the stalled run every subscriber, the stalled one too, received every message "
                   "in order, exactly once")
    return out


def problems(result: dict[str, Any]) -> list[str]:
    out = [f"memory: {r['problem']}" for r in result["idle"] if r.get("problem")]
    s = result.get("stalled")
    if s:
        out.extend(f"memory, stalled run: {p}" for p in s["problems"])
    return out
