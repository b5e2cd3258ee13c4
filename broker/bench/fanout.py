"""Fan-out: one publisher, N subscribers, delivered messages per second.

Each row runs twice back to back with the same load processes: against
pybroker (a fresh broker, durable log on, the default fsync policy unless
--broker-args says otherwise) and against the reference relay
(``relay.py``), so every figure comes with "pybroker / relay ceiling"
measured in the same sitting.
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

from .context import Context
from .drive import Load, Outcome, delivery_rate, drive, rate, unique_topic
from .report import cores, count, mib, ratio, table


def measure(ctx: Context, args: argparse.Namespace, kind: str, n: int, size: int, mode: str) -> dict[str, Any]:
    name = f"fanout-{kind}-{size}B-{n}-{mode}"
    with ctx.target(kind, name) as target:
        load = Load(
            target=target,
            label=f"fan-out {size} B, N={n}, {mode}, {kind}",
            topic=unique_topic("fanout"),
            subscribers=n,
            messages=args.messages or 0,
            mode=mode,
            sub_procs=args.sub_procs,
            publisher=publisher_spec(args, size),
            load_cpus=ctx.load_cpus,
            timeout=ctx.timeout,
        )
        outcome = drive(load, ctx.workdir / name, ctx.progress)
        peak = ctx.peak_rss_kb(target)
    return summarize(outcome, peak)


def publisher_spec(args: argparse.Namespace, size: int) -> dict[str, Any]:
    return {
        "role": "publish",
        "duration": 0.0 if getattr(args, "messages", None) else getattr(args, "duration", 0.0),
        "publisher": args.publisher,
        "size": size,
        "batch": args.batch,
        "window": args.window,
        "max_pending": args.max_pending or args.batch * args.window,
    }


def combine(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Rounds of one row and target: medians, the range of the rate, every problem."""
    if len(results) == 1:
        return results[0]
    out: dict[str, Any] = {}
    for key in ("published", "delivered", "seconds", "delivered_per_s", "publisher_acked", "publisher_acked_per_s",
                "cpu_cores", "load_cpu_cores", "peak_rss_kb"):
        values = [r[key] for r in results if r.get(key) is not None]
        out[key] = statistics.median(values) if values else None
    rates = [float(r["delivered_per_s"]) for r in results]
    out["delivered_per_s_range"] = [min(rates), max(rates)]
    out["ack_durability"] = results[0]["ack_durability"]
    out["verified"] = all(r["verified"] for r in results)
    out["problems"] = [f"round {i + 1}: {p}" for i, r in enumerate(results) for p in r["problems"]]
    return out


def summarize(outcome: Outcome, peak_rss_kb: int | None) -> dict[str, Any]:
    delivered, seconds, delivered_rate = delivery_rate(outcome)
    pub = outcome.publisher
    pub_seconds = float(pub.get("acked_at") or 0.0) - float(pub.get("start") or 0.0)
    return {
        "published": pub.get("sent", 0),
        "delivered": delivered,
        "seconds": seconds,
        "delivered_per_s": delivered_rate,
        "publisher_acked": pub.get("acked", 0),
        "publisher_acked_per_s": rate(float(pub.get("acked", 0)), pub_seconds),
        "ack_durability": pub.get("durability", {}),
        "cpu_cores": outcome.cpu_cores,
        "load_cpu_cores": outcome.load_cpu_cores,
        "peak_rss_kb": peak_rss_kb,
        "verified": outcome.verified,
        "problems": outcome.problems,
    }


def run(ctx: Context, args: argparse.Namespace) -> dict[str, Any]:
    modes = ["raw", "decode"] if args.mode == "both" else [args.mode]
    kinds = ["pybroker", "relay"] if args.with_relay else ["pybroker"]
    rows: list[dict[str, Any]] = []
    for n in args.subscribers:
        for size in args.sizes:
            for mode in modes:
                row: dict[str, Any] = {"size": size, "subscribers": n, "mode": mode, "publisher": args.publisher}
                rounds = []
                for i in range(args.repeat):
                    # pybroker and the relay back to back, so each ratio compares one sitting
                    one: dict[str, Any] = {kind: measure(ctx, args, kind, n, size, mode) for kind in kinds}
                    if "relay" in one and one["relay"]["delivered_per_s"]:
                        one["ratio"] = one["pybroker"]["delivered_per_s"] / one["relay"]["delivered_per_s"]
                        cpu = _cpu_per_message(one["pybroker"]), _cpu_per_message(one["relay"])
                        if cpu[0] is not None and cpu[1]:
                            one["cpu_ratio"] = cpu[0] / cpu[1]
                    rounds.append(one)
                    if args.repeat > 1:
                        ctx.progress.note(f"  round {i + 1} of {args.repeat}: " + _row_line(dict(row, **one)))
                for kind in kinds:
                    row[kind] = combine([r[kind] for r in rounds])
                ratios = [float(r["ratio"]) for r in rounds if "ratio" in r]
                if ratios:
                    row["ratio"] = statistics.median(ratios)
                    row["ratio_range"] = [min(ratios), max(ratios)]
                cpu_ratios = [float(r["cpu_ratio"]) for r in rounds if "cpu_ratio" in r]
                if cpu_ratios:
                    row["cpu_ratio"] = statistics.median(cpu_ratios)
                if args.repeat > 1:
                    row["rounds"] = rounds
                rows.append(row)
                ctx.progress.note(_row_line(row))
    return {
        "rows": rows,
        "repeat": args.repeat,
        "messages_per_run": args.messages,
        "duration_per_run": None if args.messages else args.duration,
        "publisher": args.publisher,
        "batch": args.batch,
        "window": args.window,
        "sub_procs": args.sub_procs,
    }


def _row_line(row: dict[str, Any]) -> str:
    parts = [f"fan-out {row['size']} B, N={row['subscribers']}, {row['mode']}:"]
    for kind in ("pybroker", "relay"):
        if kind in row:
            r = row[kind]
            parts.append(f"{kind} {count(r['delivered_per_s'])} msg/s ({'verified' if r['verified'] else 'INCOMPLETE'})")
    if "ratio" in row:
        parts.append(f"pybroker/relay {ratio(row['ratio'])}")
    return " ".join(parts)


def render(result: dict[str, Any]) -> str:
    headers = ["payload", "subs", "mode", "pybroker msg/s", "relay msg/s", "pybroker/relay",
               "CPU/msg vs relay", "pub acked msg/s", "CPU broker/load", "CPU relay/load", "broker peak RSS MiB",
               "delivery"]
    lines = []
    for row in result["rows"]:
        p = row["pybroker"]
        r = row.get("relay")
        ok = p["verified"] and (r is None or r["verified"])
        lines.append([
            f"{row['size']} B", str(row["subscribers"]), row["mode"],
            _rate(p), _rate(r) if r else "-",
            _ratio(row), ratio(row.get("cpu_ratio")), count(p["publisher_acked_per_s"]),
            _cpu(p), _cpu(r) if r else "-",
            mib(p["peak_rss_kb"]), "verified" if ok else "INCOMPLETE",
        ])
    publisher = (
        f"pre-encoded batches of {result['batch']} messages, {result['window']} PUBLISH frames in flight"
        if result["publisher"] == "fast" else "client library (send() in a loop)"
    )
    repeat = result.get("repeat", 1)
    amount = (
        f"{result['messages_per_run']:,} messages per run" if result["messages_per_run"]
        else f"publishing for {result['duration_per_run']:g} s per run"
    )
    title = (
        f"Fan-out: 1 publisher ({publisher}), N subscribers, {amount}; "
        f"delivered msg/s = all subscribers' messages / (first send -> last delivery)"
        + (f"; medians of {repeat} rounds (min-max), ratio = median of the rounds' ratios" if repeat > 1 else "")
        + "\nCPU/msg vs relay: the broker's CPU seconds per delivered message over the relay's, same round "
        "(a figure for rows where neither target has a whole core's work); CPU in cores over the run"
    )
    return title + "\n" + table(headers, lines)


def _cpu_per_message(r: dict[str, Any]) -> float | None:
    """Target CPU seconds per delivered message."""
    if r.get("cpu_cores") is None or not r["delivered_per_s"]:
        return None
    return float(r["cpu_cores"]) / float(r["delivered_per_s"])


def _rate(r: dict[str, Any]) -> str:
    span = r.get("delivered_per_s_range")
    text = count(r["delivered_per_s"])
    return f"{text} ({count(span[0])}-{count(span[1])})" if span else text


def _ratio(row: dict[str, Any]) -> str:
    span = row.get("ratio_range")
    text = ratio(row.get("ratio"))
    return f"{text} ({ratio(span[0])}-{ratio(span[1])})" if span and span[0] != span[1] else text


def _cpu(r: dict[str, Any]) -> str:
    return f"{cores(r['cpu_cores'])}/{cores(r['load_cpu_cores'])}"


def problems(result: dict[str, Any]) -> list[str]:
    out = []
    for row in result["rows"]:
        for kind in ("pybroker", "relay"):
            if kind in row:
                for p in row[kind]["problems"]:
                    out.append(f"fan-out {row['size']} B N={row['subscribers']} {row['mode']} ({kind}): {p}")
    return out


def claims(result: dict[str, Any]) -> list[str]:
    runs = sum(max(1, result.get("repeat", 1)) for row in result["rows"] for k in ("pybroker", "relay") if k in row)
    return [f"in all {runs} fan-out runs every subscriber received every message in order, exactly once, "
            "and every publish was acknowledged in order with contiguous offsets"]
