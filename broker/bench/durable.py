"""Durable publish: acknowledged messages per second for each fsync policy.

One pipelined publisher, no subscribers, a fresh broker per policy (file
log in a temporary directory). Every PUBACK is checked: in order, offsets
contiguous, one per message; the durability the acks promise is tallied,
and with ``always`` anything but "on disk" is reported.
"""

from __future__ import annotations

import argparse
from typing import Any

from .context import Context
from .drive import Load, drive, rate, unique_topic
from .fanout import publisher_spec
from .latency import cpu_us_per_message
from .report import cores, count, mib, table


def run(ctx: Context, args: argparse.Namespace) -> dict[str, Any]:
    rows = []
    policies = ["(as configured)"] if ctx.url else args.policies
    for policy in policies:
        extra = [] if ctx.url else ["--fsync", policy]
        name = f"durable-{policy.strip('()').replace(' ', '-')}"
        with ctx.target("pybroker", name, extra) as target:
            load = Load(
                target=target,
                label=f"durable publish, fsync {policy}",
                topic=unique_topic("durable"),
                subscribers=0,
                messages=args.messages or 0,
                mode="raw",
                sub_procs=1,
                publisher=publisher_spec(args, args.size),
                load_cpus=ctx.load_cpus,
                timeout=ctx.timeout,
            )
            outcome = drive(load, ctx.workdir / name, ctx.progress)
            peak = ctx.peak_rss_kb(target)
        pub = outcome.publisher
        problems = list(outcome.problems)
        durability: dict[str, int] = pub.get("durability", {})
        if policy == "always" and set(durability) - {"DISK"}:
            problems.append(f"fsync always acknowledged messages as {durability}, not all DISK")
        seconds = float(pub.get("acked_at") or 0.0) - float(pub.get("start") or 0.0)
        row = {
            "policy": policy,
            "messages": pub.get("sent", 0),
            "size": args.size,
            "acked": pub.get("acked", 0),
            "seconds": seconds,
            "acked_per_s": rate(float(pub.get("acked", 0)), seconds),
            "ack_durability": durability,
            "cpu_cores": outcome.cpu_cores,
            "cpu_us_per_message": cpu_us_per_message(outcome, int(pub.get("acked") or 0)),
            "load_cpu_cores": outcome.load_cpu_cores,
            "peak_rss_kb": peak,
            "verified": not problems,
            "problems": problems,
        }
        rows.append(row)
        ctx.progress.note(
            f"durable publish, fsync {policy}: {count(row['acked_per_s'])} acked msg/s, acks {durability} "
            f"({'verified' if row['verified'] else 'PROBLEMS'})"
        )
    in_flight = args.batch * args.window if args.publisher == "fast" else (args.max_pending or args.batch * args.window)
    return {"rows": rows, "publisher": args.publisher, "batch": args.batch, "window": args.window,
            "in_flight_messages": in_flight}


def render(result: dict[str, Any]) -> str:
    headers = ["fsync", "payload", "messages", "acked msg/s", "acks promise", "CPU broker/load", "broker CPU µs/msg", "peak RSS MiB", "acks"]
    lines = [
        [r["policy"], f"{r['size']} B", count(r["messages"]), count(r["acked_per_s"]),
         ", ".join(f"{k} {v:,}" for k, v in r["ack_durability"].items()) or "-",
         f"{cores(r['cpu_cores'])}/{cores(r['load_cpu_cores'])}",
         "-" if r.get("cpu_us_per_message") is None else f"{r['cpu_us_per_message']:,.2f}", mib(r["peak_rss_kb"]), "verified" if r["verified"] else "PROBLEMS"]
        for r in result["rows"]
    ]
    publisher = (
        f"pre-encoded batches of {result['batch']}, {result['window']} frames in flight "
        f"(up to {result['in_flight_messages']:,} messages)"
        if result["publisher"] == "fast"
        else f"client library, up to {result['in_flight_messages']:,} messages unacknowledged"
    )
    return f"Durable publish: one pipelined publisher ({publisher}), acknowledged msg/s\n" + table(headers, lines)


def claims(result: dict[str, Any]) -> list[str]:
    out = ["every durable publish was acknowledged once, in order, with contiguous offsets"]
    if any(r["policy"] == "always" for r in result["rows"]):
        out.append("with fsync always every acknowledgement promised DISK")
    return out


def problems(result: dict[str, Any]) -> list[str]:
    return [f"durable publish, fsync {r['policy']}: {p}" for r in result["rows"] for p in r["problems"]]
