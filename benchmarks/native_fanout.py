"""Fan-out measured with a native load generator (benchmarks/native/fanload.c).

    python benchmarks/native_fanout.py --subscribers 10 --payload 1024 --repeat 3

Python load processes top out near 1.5 M delivered 1 KiB messages a second on
this machine's spare core, below what the broker can forward, so with them
`pybroker bench fanout` measures the load side at 1 KiB. This script builds
the C generator with the system's C compiler (gcc or cc; a benchmark tool,
not a dependency of the package), then alternates pybroker and the reference
relay (`pybroker.server.bench.relay`), each pinned to the first CPU with the
generator on the others, and prints delivered msg/s, the target's CPU per
delivered message, and pybroker / relay per round.

The publisher sends one PUBLISH of `--per-frame` messages again and again
(request_id 0, so no PUBACKs), as fast as TCP takes it; the default
(4,000 x 1 KiB, about 4 MiB) is "a frame per generator flush".
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pybroker.server.bench.procs import cpu_seconds, loadavg, start_broker, start_relay  # noqa: E402

SOURCE = Path(__file__).resolve().parent / "native" / "fanload.c"


def build(workdir: Path) -> Path:
    compiler = shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        raise SystemExit("native_fanout: no C compiler (gcc or cc) on PATH")
    exe = workdir / "fanload"
    subprocess.run([compiler, "-O2", "-pthread", "-o", str(exe), str(SOURCE)], check=True)
    return exe


def one_run(exe: Path, kind: str, workdir: Path, args: argparse.Namespace, cpus: list[int]) -> dict[str, Any]:
    target_cpus, load_cpus = ([cpus[0]], cpus[1:]) if len(cpus) > 1 else (None, None)
    run_dir = Path(tempfile.mkdtemp(prefix=f"{kind}-", dir=workdir))
    if kind == "relay":
        target = start_relay(run_dir, target_cpus)
    else:
        target = start_broker(run_dir, ["--fsync", args.fsync, *args.broker_arg], target_cpus)
    try:
        url = urlsplit(target.url)
        cpu_before = cpu_seconds(target.pid)
        proc = subprocess.run(
            [str(exe), url.hostname or "127.0.0.1", str(url.port), args.topic, str(args.payload),
             str(args.subscribers), str(args.per_frame), str(args.frames), str(args.timeout)],
            capture_output=True, text=True, timeout=args.timeout + 30,
            preexec_fn=(lambda: os.sched_setaffinity(0, set(load_cpus))) if load_cpus else None,
        )
        cpu_after = cpu_seconds(target.pid)
        if not proc.stdout.strip():
            raise SystemExit(f"native_fanout: the generator failed: {proc.stderr.strip()}")
        result: dict[str, Any] = json.loads(proc.stdout)
        result["kind"] = kind
        if cpu_before is not None and cpu_after is not None and result["delivered"]:
            result["cpu_us_per_msg"] = (cpu_after - cpu_before) * 1e6 / result["delivered"]
            result["cores"] = (cpu_after - cpu_before) / result["seconds"] if result["seconds"] else None
        if not result["complete"]:
            result["problem"] = proc.stderr.strip() or "not every message arrived in time"
        return result
    finally:
        target.stop()
        shutil.rmtree(run_dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subscribers", type=int, default=10)
    parser.add_argument("--payload", type=int, default=1024, help="bytes per message")
    parser.add_argument("--per-frame", type=int, default=4000, help="messages per PUBLISH")
    parser.add_argument("--frames", type=int, default=1000, help="PUBLISH frames sent per run")
    parser.add_argument("--repeat", type=int, default=3, help="rounds (pybroker, relay, ...)")
    parser.add_argument("--fsync", default="never", choices=["always", "interval", "never"])
    parser.add_argument("--topic", default="bench.native")
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--no-relay", action="store_true", help="measure pybroker only")
    parser.add_argument("--broker-arg", action="append", default=[], help="extra `pybroker serve` argument")
    args = parser.parse_args(argv)
    cpus = sorted(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory(prefix="native-fanout-") as tmp:
        workdir = Path(tmp)
        exe = build(workdir)
        rounds: list[dict[str, Any]] = []
        print(f"load {loadavg()}; {args.subscribers} subscribers, {args.per_frame} x {args.payload} B per frame, "
              f"{args.frames} frames, fsync {args.fsync}", file=sys.stderr)
        for i in range(args.repeat):
            row: dict[str, Any] = {"round": i + 1}
            for kind in ("pybroker",) if args.no_relay else ("pybroker", "relay"):
                row[kind] = one_run(exe, kind, workdir, args, cpus)
                print(f"  round {i + 1} {kind}: {row[kind]['rate']:,.0f} msg/s", file=sys.stderr)
            if not args.no_relay and row["relay"]["rate"]:
                row["ratio"] = row["pybroker"]["rate"] / row["relay"]["rate"]
            rounds.append(row)
    report(rounds, args)
    return 0 if all(r[k].get("complete") for r in rounds for k in r if k not in ("round", "ratio")) else 1


def report(rounds: list[dict[str, Any]], args: argparse.Namespace) -> None:
    print(f"| round | pybroker msg/s | µs CPU/msg | relay msg/s | µs CPU/msg | ratio |")
    print("|---|---|---|---|---|---|")
    for r in rounds:
        pb, rl = r["pybroker"], r.get("relay", {})
        print(f"| {r['round']} | {pb['rate']:,.0f} | {pb.get('cpu_us_per_msg', 0):.3f} | "
              f"{rl.get('rate', 0):,.0f} | {rl.get('cpu_us_per_msg', 0):.3f} | {r.get('ratio', 0):.2f} |")
    rates = [r["pybroker"]["rate"] for r in rounds]
    line = f"median pybroker {statistics.median(rates):,.0f} msg/s"
    if not args.no_relay:
        line += f", relay {statistics.median(r['relay']['rate'] for r in rounds):,.0f}, ratio {statistics.median(r['ratio'] for r in rounds):.2f}"
    print(line)
    for r in rounds:
        for k in ("pybroker", "relay"):
            if k in r and r[k].get("problem"):
                print(f"round {r['round']} {k}: {r[k]['problem']}")


if __name__ == "__main__":
    sys.exit(main())
