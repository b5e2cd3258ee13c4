"""Latency measured with a native load generator (benchmarks/native/latload.c).

    python benchmarks/native_latency.py --repeat 3

`pybroker bench latency --per-frame 1` reads its ten subscribers in Python on
one core (~100,000 deliveries a second), and with them the reference relay,
which only forwards, shows a p99 of ~1.3 ms: the load side sets the upper
percentiles. This script builds the C generator with the system's C compiler
(gcc or cc; a benchmark tool, not a dependency of the package), then per
round runs pybroker with `--fsync never`, pybroker with `--fsync always`
(`--fsync` picks one) and the reference relay (`pybroker.server.bench.relay`),
each pinned to the first CPU with the generator on the others. Per run it
prints p50/p99/p99.9/max publish-to-deliver latency in µs, the target's CPU
in cores (its CPU seconds over the run's wall seconds), the generator's, the
other processes' on the shared machine (those alive at both ends of the run)
and the load average; then the medians against issue 17's targets (p99 <=
1 ms with fsync never; p99 <= 2 ms and p99.9 <= 5 ms with fsync always).

The generator publishes `--rate` messages a second for `--duration` seconds,
`--per-frame` messages per PUBLISH (request_id 0: no PUBACKs), paced by an
absolute schedule, the frames due every `--tick-ms` in one write as
`pybroker bench latency` sends them (`--tick-ms 0`: each frame at its own
due time, a write every 100 µs at 10,000 msg/s). Each payload carries the
actual send time (CLOCK_MONOTONIC, read just before the write) and a
sequence number; every subscriber's every message is timed and checked for
loss and order. Messages of the first `--warmup` seconds are counted, not
sampled.

On a shared machine the upper percentiles are mostly other processes
preempting the target and the generator (benchmarks/README.md, "Latency
with a native load side"). `--realtime` (SCHED_FIFO for both; root or
CAP_SYS_NICE) shows the figures without that, as a diagnostic. It means
something only while the target stays well below one core: the kernel stops
SCHED_FIFO tasks for the rest of each second once they have run 0.95 s of it
(sched_rt_runtime_us), and the report says when a run came near that.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pybroker.server.bench.procs import cpu_seconds, loadavg, start_broker, start_relay  # noqa: E402

SOURCE = Path(__file__).resolve().parent / "native" / "latload.c"
#: Issue 17's targets, per fsync policy: (percentile key, µs).
TARGETS = {"never": [("p99_us", 1000.0)], "always": [("p99_us", 2000.0), ("p99.9_us", 5000.0)]}


def process_cpu() -> dict[int, float]:
    """CPU seconds (user + system, all threads) of every process, by pid.
    Per-process times are exact (the scheduler's runtime); /proc/stat's
    per-CPU counters are sampled at ticks and miss most of a process that
    wakes every millisecond, so the neighbours are measured this way."""
    ticks = os.sysconf("SC_CLK_TCK")
    out: dict[int, float] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        fields = stat[stat.rindex(")") + 2 :].split()
        out[int(entry.name)] = (int(fields[11]) + int(fields[12])) / ticks
    return out


def children_cpu() -> float:
    """CPU seconds of the finished children waited for (the generator)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def build(workdir: Path) -> Path:
    compiler = shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        raise SystemExit("native_latency: no C compiler (gcc or cc) on PATH")
    exe = workdir / "latload"
    subprocess.run([compiler, "-O2", "-pthread", "-o", str(exe), str(SOURCE), "-lm"], check=True)
    return exe


#: SCHED_FIFO priorities with --realtime (the generator's threads above the
#: target's; they run on different CPUs, so it matters little).
GENERATOR_PRIORITY, TARGET_PRIORITY = 50, 40


def realtime(pid: int, priority: int) -> None:
    """SCHED_FIFO for every thread of pid; threads it starts later inherit
    it. Needs root or CAP_SYS_NICE (PermissionError otherwise)."""
    for task in os.listdir(f"/proc/{pid}/task"):
        os.sched_setscheduler(int(task), os.SCHED_FIFO, os.sched_param(priority))


def rt_share() -> float | None:
    """The share of each period SCHED_FIFO tasks may run before the kernel
    stops them for the rest of it (0.95 by default: 50 ms of every second)."""
    try:
        runtime = int(Path("/proc/sys/kernel/sched_rt_runtime_us").read_text())
        period = int(Path("/proc/sys/kernel/sched_rt_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if runtime < 0 else runtime / period


def generator_setup(load_cpus: list[int] | None, rt: bool) -> Any:
    def setup() -> None:
        if load_cpus:
            os.sched_setaffinity(0, set(load_cpus))
        if rt:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(GENERATOR_PRIORITY))
    return setup if load_cpus or rt else None


def generator_argv(exe: Path, host: str, port: int, args: argparse.Namespace) -> list[str]:
    return [str(exe), host, str(port), args.topic, str(args.payload), str(args.subscribers), str(args.rate),
            str(args.duration), str(args.warmup), str(args.per_frame), str(args.tick_ms * 1000), str(args.timeout)]


def one_run(exe: Path, kind: str, fsync: str | None, workdir: Path, args: argparse.Namespace,
            cpus: list[int]) -> dict[str, Any]:
    target_cpus, load_cpus = ([cpus[0]], cpus[1:]) if len(cpus) > 1 else (None, None)
    run_dir = Path(tempfile.mkdtemp(prefix=f"{kind}-", dir=workdir))
    if kind == "relay":
        target = start_relay(run_dir, target_cpus)
    else:
        target = start_broker(run_dir, ["--fsync", str(fsync), *args.broker_arg], target_cpus)
    try:
        if args.realtime and target.pid is not None:
            realtime(target.pid, TARGET_PRIORITY)
        url = urlsplit(target.url)
        load_before = loadavg()
        procs_before, gen_before = process_cpu(), children_cpu()
        cpu_before, wall_before = cpu_seconds(target.pid), time.monotonic()
        proc = subprocess.run(
            generator_argv(exe, url.hostname or "127.0.0.1", url.port or 0, args),
            capture_output=True, text=True, timeout=args.timeout + 30,
            preexec_fn=generator_setup(load_cpus, args.realtime),
        )
        cpu_after, wall = cpu_seconds(target.pid), time.monotonic() - wall_before
        procs_after, gen_cpu = process_cpu(), children_cpu() - gen_before
        if not proc.stdout.strip():
            raise SystemExit(f"native_latency: the generator failed ({proc.returncode}): {proc.stderr.strip()}")
        result: dict[str, Any] = json.loads(proc.stdout)
        result.update(kind=kind, fsync=fsync, realtime=args.realtime, load_before=load_before,
                      load_after=loadavg(), wall_seconds=wall)
        if cpu_before is not None and cpu_after is not None and wall > 0:
            result["cores"] = (cpu_after - cpu_before) / wall
            result["generator_cores"] = gen_cpu / wall
            # The machine is shared: the CPU every other process (alive at
            # both ends of the run) used meanwhile, on any CPU. (max: a pid
            # reused meanwhile is another process.)
            both = (procs_after.keys() & procs_before.keys()) - {target.pid, os.getpid()}
            others = sum(max(0.0, procs_after[pid] - procs_before[pid]) for pid in both)
            result["other_processes_cores"] = others / wall
        if not result["complete"]:
            result["problem"] = proc.stderr.strip() or "not every message arrived, once and in order, in time"
        return result
    finally:
        target.stop()
        shutil.rmtree(run_dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=int, default=10000, help="messages per second offered")
    parser.add_argument("--subscribers", type=int, default=10)
    parser.add_argument("--payload", type=int, default=128, help="bytes per message, at least 16")
    parser.add_argument("--per-frame", type=int, default=1, help="messages per PUBLISH frame")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of load per run")
    parser.add_argument("--tick-ms", type=float, default=1.0,
                        help="the publisher wakes every this many ms and sends what is due in one write, as "
                             "`pybroker bench latency` does (default 1); 0: each frame at its own due time")
    parser.add_argument("--warmup", type=float, default=2.0, help="leave out messages of the first S seconds")
    parser.add_argument("--repeat", type=int, default=3, help="rounds")
    parser.add_argument("--fsync", default="both", choices=["never", "always", "both"],
                        help="pybroker's fsync policy (default: both, one run each per round)")
    parser.add_argument("--topic", default="bench.latency")
    parser.add_argument("--timeout", type=float, default=None, help="seconds a run may take (default: duration + 60)")
    parser.add_argument("--no-relay", action="store_true", help="measure pybroker only")
    parser.add_argument("--broker-arg", action="append", default=[], help="extra `pybroker serve` argument")
    parser.add_argument("--realtime", action="store_true",
                        help="run the target and the generator SCHED_FIFO (root or CAP_SYS_NICE): a diagnostic "
                             "of what the percentiles are without the machine's other processes preempting them")
    parser.add_argument("--json", metavar="FILE", help="write every run's result to FILE")
    args = parser.parse_args(argv)
    if args.timeout is None:
        args.timeout = args.duration + 60
    policies = ["never", "always"] if args.fsync == "both" else [args.fsync]
    kinds: list[tuple[str, str | None]] = [("pybroker", p) for p in policies]
    if not args.no_relay:
        kinds.append(("relay", None))
    cpus = sorted(os.sched_getaffinity(0))
    runs: list[dict[str, Any]] = []
    print(f"load {loadavg()}; {args.rate:,} msg/s offered, {args.subscribers} subscribers, {args.payload} B, "
          f"{args.per_frame} per frame, {tick(args)}, {args.duration:g} s (first {args.warmup:g} s left out)"
          f"{', SCHED_FIFO' if args.realtime else ''}", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="native-latency-") as tmp:
        workdir = Path(tmp)
        exe = build(workdir)
        for i in range(args.repeat):
            for kind, fsync in kinds:
                result = one_run(exe, kind, fsync, workdir, args, cpus)
                result["round"] = i + 1
                runs.append(result)
                print(f"  round {i + 1} {label(result)}: p99 {result['p99_us']:,.0f} µs, load {result['load_before']}",
                      file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=1) + "\n")
    report(runs, kinds)
    return 0 if all(r["complete"] for r in runs) else 1


def tick(args: argparse.Namespace) -> str:
    return f"a write every {args.tick_ms:g} ms" if args.tick_ms else "each frame written at its own due time"


def label(run: dict[str, Any]) -> str:
    return run["kind"] if run["fsync"] is None else f"{run['kind']} fsync {run['fsync']}"


def _fmt(run: dict[str, Any], key: str) -> str:
    return f"{run[key]:.2f}" if run.get(key) is not None else "-"


def report(runs: list[dict[str, Any]], kinds: list[tuple[str, str | None]]) -> None:
    print("| round | target | p50 µs | p99 µs | p99.9 µs | max µs | samples | lost/out of order | "
          "target cores | generator cores | other processes' cores | publisher max behind µs | load avg before → after |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        print(f"| {r['round']} | {label(r)} | {r['p50_us']:,.0f} | {r['p99_us']:,.0f} | {r['p99.9_us']:,.0f} | "
              f"{r['max_us']:,.0f} | {r['count']:,} | {r['lost']}/{r['out_of_order']} | {_fmt(r, 'cores')} | "
              f"{_fmt(r, 'generator_cores')} | {_fmt(r, 'other_processes_cores')} | "
              f"{r['publisher_max_behind_us']:,.0f} | {r['load_before']} → {r['load_after']} |")
    for kind, fsync in kinds:
        mine = [r for r in runs if r["kind"] == kind and r["fsync"] == fsync]
        med = {k: statistics.median(r[k] for r in mine) for k in ("p50_us", "p99_us", "p99.9_us", "max_us")}
        line = (f"median {label(mine[0])}: p50 {med['p50_us']:,.0f}, p99 {med['p99_us']:,.0f}, "
                f"p99.9 {med['p99.9_us']:,.0f}, max {med['max_us']:,.0f} µs")
        if fsync in TARGETS:
            verdicts = [f"{key[:-3]} <= {limit / 1000:g} ms {'met' if med[key] <= limit else 'MISSED'}"
                        for key, limit in TARGETS[fsync]]
            line += " (target: " + ", ".join(verdicts) + ")"
        print(line)
    share = rt_share()
    for r in runs:
        if r.get("realtime") and share is not None and (r.get("cores") or 0) > share - 0.1:
            print(f"round {r['round']} {label(r)}: the target used {r['cores']:.2f} core under SCHED_FIFO, near the "
                  f"kernel's real-time limit ({share:.2f} of each period, then it is stopped for the rest): "
                  "its tail is that throttling, not a measurement")
    for r in runs:
        if r.get("problem"):
            print(f"round {r['round']} {label(r)}: {r['problem']}")


if __name__ == "__main__":
    sys.exit(main())
