"""``pybroker bench``: its command line, the run header and the final report."""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import shlex
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from ..cli.serve import serve_parser
from . import durable, fanout, latency, memory
from .context import Context
from .drive import Progress
from .procs import loadavg
from .report import write_json

SCENARIOS: dict[str, ModuleType] = {"fanout": fanout, "durable": durable, "latency": latency, "memory": memory}


def _ints(text: str) -> list[int]:
    try:
        values = [int(v.replace("_", "")) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _positive(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("common options")
    g.add_argument("--url", help="benchmark the broker at this URL instead of starting one (the relay is still started here)")
    g.add_argument("--broker-pid", type=int, help="with --url: the broker's process id, for RSS and CPU figures")
    g.add_argument("--broker-python", metavar="PYTHON", help="the Python whose `pybroker serve` the brokers it starts run (default: this one), e.g. another tree's venv for a before/after with the same load")
    g.add_argument("--broker-args", default="", metavar="ARGS", help="extra `pybroker serve` arguments for the brokers it starts, e.g. --broker-args='--fsync never'")
    g.add_argument("--pin", action=argparse.BooleanOptionalAction, default=None, help="pin the broker (or relay) to the first CPU and the load processes to the others (default: on with 2 or more CPUs)")
    g.add_argument("--json", type=Path, metavar="FILE", help="write the results (full precision) to FILE")
    g.add_argument("--timeout", type=_positive(float), default=300.0, metavar="S", help="give up on a run after S seconds (default 300)")
    g.add_argument("--workdir", type=Path, help="where temporary data directories go (default: the system temp dir)")
    g.add_argument("--quiet", action="store_true", help="no progress on stderr")

    load = argparse.ArgumentParser(add_help=False)
    g = load.add_argument_group("publisher")
    g.add_argument("--publisher", choices=("fast", "client"), default="fast", help="fast: pre-encoded batches over a raw connection, pipelined, every PUBACK checked (default); client: the client library's send() in a loop")
    g.add_argument("--batch", type=_positive(int), default=500, help="messages per PUBLISH frame for the fast publisher (default 500)")
    g.add_argument("--window", type=_positive(int), default=32, help="PUBLISH frames in flight for the fast publisher (default 32)")
    g.add_argument("--max-pending", type=_positive(int), default=None, help="messages unacknowledged for the client publisher (default batch x window)")

    parser = argparse.ArgumentParser(
        prog="pybroker bench",
        description="Benchmarks with verified delivery: fan-out (against a reference relay in the same run), "
        "durable publish, latency, memory. Starts its own broker on a temporary data directory unless --url.",
    )
    scenarios = parser.add_subparsers(dest="scenario", required=True, metavar="SCENARIO")

    p = scenarios.add_parser("fanout", parents=[common, load], help="1 publisher, N subscribers: delivered msg/s, pybroker / relay ceiling")
    p.add_argument("--subscribers", type=_ints, default=[1, 10, 100], metavar="N,...", help="subscriber counts (default 1,10,100)")
    p.add_argument("--sizes", "--size", type=_ints, default=[16, 128, 1024], metavar="BYTES,...", help="payload sizes (default 16,128,1024)")
    p.add_argument("--duration", type=_positive(float), default=3.0, metavar="S", help="the publisher publishes for S seconds per run (default 3); subscribers then get everything it sent")
    p.add_argument("--messages", type=_positive(int), default=None, help="publish exactly this many messages per run instead of --duration")
    p.add_argument("--mode", choices=("raw", "decode", "both"), default="raw", help="raw: subscribers count messages from batch headers (codec only); decode: client library, a callback per message (default raw)")
    p.add_argument("--sub-procs", type=_positive(int), default=10, help="at most this many subscriber processes; connections are spread over them (default 10)")
    p.add_argument("--with-relay", "--relay", dest="with_relay", action=argparse.BooleanOptionalAction, default=True, help="run every row against the reference relay too (default on)")
    p.add_argument("--repeat", type=_positive(int), default=1, help="rounds per row, each pybroker then relay; the table gives medians and ranges (default 1)")

    p = scenarios.add_parser("durable", parents=[common, load], help="acknowledged msg/s per fsync policy")
    p.add_argument("--policies", type=lambda t: [x for x in t.split(",") if x], default=["always", "interval", "never"], help="fsync policies (default always,interval,never)")
    p.add_argument("--duration", type=_positive(float), default=3.0, metavar="S", help="publish for S seconds per policy (default 3)")
    p.add_argument("--messages", type=_positive(int), default=None, help="publish exactly this many messages per policy instead of --duration")
    p.add_argument("--size", type=_positive(int), default=128, help="payload bytes (default 128)")

    p = scenarios.add_parser("latency", parents=[common], help="p50/p99/p99.9 publish-to-deliver at a fixed rate")
    p.add_argument("--rate", type=_positive(int), default=10_000, help="messages per second offered (default 10000)")
    p.add_argument("--subscribers", type=_positive(int), default=10, help="default 10")
    p.add_argument("--size", type=_positive(int), default=128, help="payload bytes, at least 8 (default 128)")
    p.add_argument("--duration", type=_positive(float), default=10.0, metavar="S", help="seconds of load (default 10)")
    p.add_argument("--warmup", type=float, default=1.0, metavar="S", help="leave out messages of the first S seconds (default 1)")
    p.add_argument("--tick-ms", type=_positive(float), default=1.0, help="the publisher sends what is due every this many ms (default 1)")
    p.add_argument("--mode", choices=("raw", "decode"), default="raw", help="raw: subscribers read each record's timestamp with the codec, so the figures are the broker's (default); decode: a client-library callback per message, so they include the Python subscriber processes")
    p.add_argument("--publisher", choices=("fast", "client"), default="fast", help="fast: one PUBLISH per tick over a raw connection (default); client: client library")
    p.add_argument("--per-frame", type=_positive(int), default=None, metavar="N", help="the fast publisher puts N messages in each PUBLISH frame (1: a frame per message, as an application publishing one message per call does); the frames due in a tick go out in one write (default: all that are due in one frame)")
    p.add_argument("--sub-procs", type=_positive(int), default=2, help="at most this many subscriber processes (default 2: fewer processes, fewer wake-ups per tick on the load core)")
    p.add_argument("--with-relay", "--relay", dest="with_relay", action=argparse.BooleanOptionalAction, default=True, help="measure the reference relay too (default on)")

    p = scenarios.add_parser("memory", parents=[common, load], help="broker RSS: idle, many idle connections, a stalled subscriber")
    p.add_argument("--connections", type=_ints, default=[1000, 10_000], metavar="N,...", help="idle subscriber connection counts (default 1000,10000)")
    p.add_argument("--conn-procs", type=_positive(int), default=4, help="processes opening the idle connections (default 4)")
    p.add_argument("--stall-messages", type=int, default=10_000_000, help="messages in the stalled-subscriber run; 0 skips it (default 10000000)")
    p.add_argument("--stall-subscribers", type=_positive(int), default=10, help="subscribers in the stalled run, one of them stalled (default 10)")
    p.add_argument("--size", type=_positive(int), default=128, help="payload bytes in the stalled run (default 128)")
    p.add_argument("--sample-interval", type=_positive(float), default=0.5, metavar="S", help="seconds between RSS samples (default 0.5)")

    scenarios.add_parser("all", parents=[common], help="every scenario with its defaults (takes a while)")
    return parser


def _default_fsync(broker_args: list[str]) -> str:
    """The fsync policy the brokers it starts will use, read from --broker-args
    by the parser `pybroker serve` uses (its errors, its defaults)."""
    try:
        fsync: str = serve_parser().parse_args(["serve", *broker_args]).fsync
    except SystemExit:
        raise SystemExit(f"pybroker bench: bad --broker-args {shlex.join(broker_args)!r}") from None
    return fsync


def _context(args: argparse.Namespace, workdir: Path) -> Context:
    cpus = sorted(os.sched_getaffinity(0))
    pin = args.pin if args.pin is not None else len(cpus) >= 2
    if pin and len(cpus) < 2:
        print("pybroker bench: --pin needs at least 2 CPUs; not pinning", file=sys.stderr)
        pin = False
    broker_args = shlex.split(args.broker_args)
    ctx = Context(
        workdir=workdir,
        progress=Progress(enabled=not args.quiet),
        url=args.url,
        broker_pid=args.broker_pid,
        broker_args=broker_args,
        broker_python=args.broker_python or sys.executable,
        target_cpus=cpus[:1] if pin else None,
        load_cpus=cpus[1:] if pin else None,
        timeout=args.timeout,
        fsync_default="(the broker at --url)" if args.url else _default_fsync(broker_args),
    )
    if ctx.load_cpus:
        os.sched_setaffinity(0, set(ctx.load_cpus))  # this process only polls; keep it off the broker's core
    return ctx


def _header(ctx: Context, argv: Sequence[str]) -> dict[str, Any]:
    import trio

    from .. import __version__

    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["pybroker", "bench", *argv]),
        "pybroker": __version__,
        "python": platform.python_version(),
        "trio": trio.__version__,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "loadavg_at_start": loadavg()},
        "pinning": ctx.pinning,
        "fsync": ctx.fsync_default,
        "broker_args": ctx.broker_args,
        "target": ctx.url or "pybroker serve --port 0 on a temporary data directory",
    }


def _scenario_args(parser: argparse.ArgumentParser, name: str, args: argparse.Namespace) -> argparse.Namespace:
    """For `all`: the scenario's defaults with the common options given."""
    own = parser.parse_args([name])
    for key in ("url", "broker_pid", "broker_args", "pin", "json", "timeout", "workdir", "quiet"):
        setattr(own, key, getattr(args, key))
    return own


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    # The raw-codec workers open plain TCP connections: a TLS broker would
    # fail every run halfway, so refuse up front.
    if (args.url or "").startswith("pybrokers:") or "--tls-cert" in args.broker_args:
        parser.error("benchmarks run over plain TCP; TLS brokers (pybrokers://, --tls-cert) are not supported")
    if getattr(args, "per_frame", None) and getattr(args, "publisher", "fast") != "fast":
        parser.error("--per-frame is for the fast publisher (the client library forms its own frames)")
    names = list(SCENARIOS) if args.scenario == "all" else [args.scenario]
    workdir = Path(tempfile.mkdtemp(prefix="pybroker-bench-", dir=args.workdir))
    ctx = _context(args, workdir)
    report = _header(ctx, argv)
    report["scenarios"] = {}
    print(f"pybroker bench {args.scenario}: {report['date']}, {report['machine']['cpus']} CPUs "
          f"(load average {report['machine']['loadavg_at_start']}), Python {report['python']}, trio {report['trio']}; "
          f"{ctx.pinning}; fsync {ctx.fsync_default}", flush=True)
    problems: list[str] = []
    try:
        for name in names:
            module = SCENARIOS[name]
            scenario_args = _scenario_args(parser, name, args) if args.scenario == "all" else args
            result = module.run(ctx, scenario_args)
            report["scenarios"][name] = result
            problems.extend(module.problems(result))
            print("\n" + module.render(result), flush=True)
            if args.json:
                write_json(args.json, report)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    report["machine"]["loadavg_at_end"] = loadavg()
    report["verified"] = not problems
    report["problems"] = problems
    print()
    if problems:
        print("NOT VERIFIED:")
        for p in problems:
            print(f"  {p}")
    else:
        claims = [c for name in names for c in SCENARIOS[name].claims(report["scenarios"][name])]
        print("Verified: " + "; ".join(dict.fromkeys(claims)) + ".")
    print(f"(load average at the end: {report['machine']['loadavg_at_end']})")
    if args.json:
        write_json(args.json, report)
        print(f"results written to {args.json}")
    return 1 if problems else 0

