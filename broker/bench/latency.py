"""Latency: publish-to-deliver percentiles at a fixed offered rate.

The publisher sends the messages due every tick (1 ms by default), each
carrying ``time.time_ns()`` taken just before it is encoded; subscribers on
the same machine compare it with ``time.time_ns()`` when the message reaches
them (per batch in raw mode, in the per-message callback in decode mode).
One clock, so no skew. Samples published during the warm-up are left out.
With the broker's default fsync policy (``always``) deliveries wait for the
fsync covering them, so the figures include it.
"""

from __future__ import annotations

import argparse
import math
from array import array
from pathlib import Path
from typing import Any

from .context import Context
from .drive import Load, Outcome, drive, rate, unique_topic
from .report import cores, count, table

PERCENTILES = (50.0, 99.0, 99.9)


def percentile(ordered: list[int], p: float) -> int:
    """Nearest-rank percentile of a sorted list."""
    return ordered[max(0, min(len(ordered) - 1, math.ceil(p / 100 * len(ordered)) - 1))]


def latencies(files: list[Path], since_ns: int) -> list[int]:
    """Latencies (ns) of messages published at or after since_ns, sorted."""
    out: list[int] = []
    for path in files:
        pairs = array("q")
        try:
            with open(path, "rb") as f:
                pairs.frombytes(f.read())
        except OSError:
            continue
        out.extend(pairs[i + 1] for i in range(0, len(pairs) - 1, 2) if pairs[i] >= since_ns)
    out.sort()
    return out


def measure(ctx: Context, args: argparse.Namespace, kind: str) -> dict[str, Any]:
    name = f"latency-{kind}"
    messages = int(args.rate * args.duration)
    with ctx.target(kind, name) as target:
        load = Load(
            target=target,
            label=f"latency {args.rate:,} msg/s to {args.subscribers}, {args.mode}, {kind}",
            topic=unique_topic("latency"),
            subscribers=args.subscribers,
            messages=messages,
            mode=args.mode,
            sub_procs=args.sub_procs,
            publisher={"role": "paced", "publisher": args.publisher, "rate": args.rate,
                       "duration": args.duration, "tick": args.tick_ms / 1000, "size": args.size,
                       "per_frame": args.per_frame},
            subscriber_extra={"latency": True},
            load_cpus=ctx.load_cpus,
            timeout=ctx.timeout,
        )
        outcome = drive(load, ctx.workdir / name, ctx.progress)
    return summarize(outcome, args)


def cpu_us_per_message(outcome: Outcome, messages: int) -> float | None:
    """The target's CPU time (utime + stime over the measured window, which
    holds all of the run's work) per message, in microseconds: the figure
    that says most on a busy machine, where rates and latencies also
    measure the neighbours."""
    if outcome.cpu_cores is None or not messages:
        return None
    return outcome.cpu_cores * outcome.active_seconds / messages * 1e6


def summarize(outcome: Outcome, args: argparse.Namespace) -> dict[str, Any]:
    pub = outcome.publisher
    start = float(pub.get("start") or 0.0)
    lat = latencies(outcome.sample_files, int((start + args.warmup) * 1e9))
    row: dict[str, Any] = {
        "samples": len(lat),
        "offered_per_s": args.rate,
        "published": pub.get("sent", 0),
        "publish_frames": pub.get("frames"),  # the fast publisher's PUBLISH frames
        "published_per_s": rate(float(pub.get("sent", 0)), float(pub.get("end") or 0.0) - start),
        "publisher_max_behind_ms": float(pub.get("max_behind") or 0.0) * 1000,
        "cpu_cores": outcome.cpu_cores,
        "cpu_us_per_message": cpu_us_per_message(outcome, int(pub.get("sent") or 0)),
        "load_cpu_cores": outcome.load_cpu_cores,
        "verified": outcome.verified,
        "problems": outcome.problems,
    }
    for p in PERCENTILES:
        row[f"p{p:g}_us"] = percentile(lat, p) / 1000 if lat else None
    row["max_us"] = lat[-1] / 1000 if lat else None
    return row


def run(ctx: Context, args: argparse.Namespace) -> dict[str, Any]:
    rows = []
    for kind in ["pybroker", "relay"] if args.with_relay else ["pybroker"]:
        row = measure(ctx, args, kind)
        row["target"] = kind
        rows.append(row)
        ctx.progress.note(
            f"latency {kind}: p50 {_us(row['p50_us'])} p99 {_us(row['p99_us'])} p99.9 {_us(row['p99.9_us'])} µs "
            f"({'verified' if row['verified'] else 'INCOMPLETE'})"
        )
    return {"rows": rows, "rate": args.rate, "subscribers": args.subscribers, "size": args.size,
            "duration": args.duration, "warmup": args.warmup, "mode": args.mode,
            "publisher": args.publisher, "tick_ms": args.tick_ms, "per_frame": args.per_frame}


def _us(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _us1(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def render(result: dict[str, Any]) -> str:
    headers = ["target", "mode", "p50 µs", "p99 µs", "p99.9 µs", "max µs", "samples", "published msg/s",
               "CPU target/load", "target CPU µs/msg", "delivery"]
    lines = [
        [r["target"], result["mode"], _us(r["p50_us"]), _us(r["p99_us"]), _us(r["p99.9_us"]), _us(r["max_us"]),
         count(r["samples"]), count(r["published_per_s"]), f"{cores(r['cpu_cores'])}/{cores(r['load_cpu_cores'])}",
         _us1(r.get("cpu_us_per_message")), "verified" if r["verified"] else "INCOMPLETE"]
        for r in result["rows"]
    ]
    measured = (
        "the broker's: raw subscribers read each record's timestamp with the codec"
        if result["mode"] == "raw"
        else "including the subscribers: a Python client-library callback per message"
    )
    title = (
        f"Latency: publish -> deliver, {result['rate']:,} msg/s offered in {result['tick_ms']:g} ms ticks "
        f"to {result['subscribers']} subscribers, {result['size']} B, {_framing(result)}, {result['duration']:g} s "
        f"(first {result['warmup']:g} s left out), one clock (time.time_ns); {measured}"
    )
    return title + "\n" + table(headers, lines)


def _framing(result: dict[str, Any]) -> str:
    if result["publisher"] == "client":
        return "frames formed by the client library"
    per_frame = result.get("per_frame") or 0
    if not per_frame:
        return "one PUBLISH frame per tick"
    return "one message per PUBLISH frame" if per_frame == 1 else f"{per_frame} messages per PUBLISH frame"


def claims(result: dict[str, Any]) -> list[str]:
    return ["in the latency runs every subscriber received every message in order, exactly once"]


def problems(result: dict[str, Any]) -> list[str]:
    return [f"latency ({r['target']}): {p}" for r in result["rows"] for p in r["problems"]]
