"""The ``pybroker`` command: serve, pub, sub, topics, groups, auth, bench."""

from __future__ import annotations

import argparse
import base64
import datetime as _dt
import getpass
import json
import os
import signal
import ssl
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import trio

from . import __version__
from .config import DEFAULT_HOST, DEFAULT_HTTP_PORT, DEFAULT_PORT, PENDING_FRAME_BUDGET_FRAMES, Config, Limits
from .framebudget import FREE_BYTES
from .storage.settings import FSYNC_MODES, SettingsResolver, TopicSettings
from .auth import DEFAULT_SCRYPT_N, Users, authenticator_for, hash_password, hash_token, new_token
from .logs import LEVELS, configure, get_logger

DEFAULT_URL = os.environ.get("PYBROKER_URL", f"pybroker://{DEFAULT_HOST}:{DEFAULT_PORT}")
DEFAULT_CA = os.environ.get("PYBROKER_CA") or None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pybroker", description="A durable pub/sub broker on Trio.")
    parser.add_argument("--version", action="version", version=f"pybroker {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the broker")
    serve.add_argument("--host", default=DEFAULT_HOST, help=f"address to bind (default {DEFAULT_HOST})")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"TCP port (default {DEFAULT_PORT}; 0 picks a free one)")
    http = serve.add_mutually_exclusive_group()
    http.add_argument("--http-port", type=int, default=None, metavar="N", help=f"HTTP port for health, metrics, the JSON API and the dashboard (default {DEFAULT_HTTP_PORT}, or a free one with --port 0; 0 picks a free one)")
    http.add_argument("--no-http", action="store_true", help="do not serve HTTP")
    serve.add_argument("--http-host", default=None, help="address to bind for HTTP (default: --host)")
    serve.add_argument("--data-dir", type=Path, default=Path("pybroker-data"), help="data directory (default ./pybroker-data)")
    serve.add_argument("--name", default=None, help="server name announced to clients (default: host name)")
    serve.add_argument("--storage", choices=("file", "memory"), default="file", help="file: the durable log in --data-dir (default); memory: nothing on disk")
    serve.add_argument("--fsync", choices=FSYNC_MODES, default="always", help="always: acks wait for the fsync covering them (group commit, default); interval: fsync every --fsync-interval-ms; never: leave it to the OS")
    serve.add_argument("--fsync-interval-ms", type=int, default=200, metavar="MS", help="with --fsync interval: milliseconds between fsyncs (default 200)")
    serve.add_argument("--group-counts-fsync", action="store_true", help="consumer groups: fsync each delivery's count before sending it, so max_deliver holds across power loss too (default: written to the OS first, which survives kill -9; costs group throughput, see benchmarks/README.md)")
    serve.add_argument("--min-free-bytes", type=int, default=0, metavar="N", help="refuse publishes (STORAGE_FULL) while the data directory's file system has fewer than N bytes free, before it is completely full (default 0: off)")
    serve.add_argument("--segment-bytes", type=int, default=64 * 1024 * 1024, metavar="N", help="roll segments at this size (default 64 MiB)")
    serve.add_argument("--retention-bytes", type=int, default=None, metavar="N", help="per topic: delete whole old segments beyond N bytes")
    serve.add_argument("--retention", type=_duration, default=None, metavar="AGE", help="per topic: delete whole segments older than AGE (e.g. 3600, 90m, 12h, 7d)")
    serve.add_argument("--topic", action="append", default=[], metavar="PATTERN:KEY=VALUE,...", help="settings for matching topics, e.g. 'metrics.>:fsync=never,retention_seconds=3600' (first match wins)")
    serve.add_argument("--auth", type=Path, default=None, metavar="FILE", help="users file (TOML): clients must authenticate and their permissions apply (README, 'Authentication and permissions')")
    serve.add_argument("--allow-anonymous-remote", action="store_true", help="without --auth, listen on a non-loopback address anyway (anyone reaching it may publish and subscribe)")
    serve.add_argument("--tls-cert", type=Path, default=None, metavar="FILE", help="serve TLS on the TCP and HTTP ports with this PEM certificate chain (clients use pybrokers://)")
    serve.add_argument("--tls-key", type=Path, default=None, metavar="FILE", help="the certificate's PEM private key, unencrypted (default: read from --tls-cert)")
    _add_limit_flags(serve)
    serve.add_argument("--log-level", choices=LEVELS, default="info")
    serve.add_argument("--log-format", choices=("console", "json"), default="console")

    pub = commands.add_parser("pub", help="publish a message (or one per line of stdin)")
    pub.add_argument("topic")
    pub.add_argument("message", nargs="?", default="-", help="the payload; '-' or nothing reads lines from stdin")
    pub.add_argument("--header", "-H", action="append", default=[], metavar="KEY=VALUE")
    pub.add_argument("--url", default=DEFAULT_URL, help=f"broker URL (default {DEFAULT_URL}, or $PYBROKER_URL)")
    _credential_flags(pub)
    _ca_option(pub)

    sub = commands.add_parser("sub", help="print messages as they arrive, until interrupted")
    sub.add_argument("pattern", help="topic or pattern: '*' matches one token, '>' the rest")
    sub.add_argument("--url", default=DEFAULT_URL, help=f"broker URL (default {DEFAULT_URL}, or $PYBROKER_URL)")
    _credential_flags(sub)
    _ca_option(sub)
    start = sub.add_mutually_exclusive_group()
    start.add_argument("--from", dest="start", choices=("new", "earliest"), default="new", help="where to start (default new)")
    start.add_argument("--from-offset", type=int, metavar="N", help="start at offset N (a topic, not a pattern)")
    start.add_argument("--since", metavar="TIME", help="start at the first message at or after an ISO 8601 time")
    sub.add_argument("--group", metavar="NAME", help="join consumer group NAME: each message to one member, acknowledged once printed")
    sub.add_argument("--count", type=int, default=0, metavar="N", help="exit after N messages")
    sub.add_argument("--json", action="store_true", help="one JSON object per line")
    sub.add_argument(
        "--no-reconnect",
        dest="reconnect",
        action="store_false",
        help="exit when the connection is lost (default: reconnect and resume, without gaps)",
    )

    groups = commands.add_parser("groups", help="consumer groups: list, inspect NAME, delete NAME")
    groups.add_argument("action", nargs="?", choices=("list", "inspect", "delete"), default="list")
    groups.add_argument("name", nargs="?", default="")
    groups.add_argument("--url", default=DEFAULT_URL, help=f"broker URL (default {DEFAULT_URL}, or $PYBROKER_URL)")
    _credential_flags(groups)
    _ca_option(groups)
    groups.add_argument("--json", action="store_true", help="print the broker's JSON answer")

    topics = commands.add_parser("topics", help="list topics with their first and next offsets")
    topics.add_argument("pattern", nargs="?", default=">", help="topic pattern (default: every topic)")
    topics.add_argument("--url", default=DEFAULT_URL, help=f"broker URL (default {DEFAULT_URL}, or $PYBROKER_URL)")
    _credential_flags(topics)
    _ca_option(topics)
    topics.add_argument("--json", action="store_true", help="one JSON object per line")

    auth = commands.add_parser("auth", help="make password and token hashes for a users file, check one")
    steps = auth.add_subparsers(dest="auth_command", required=True, metavar="ACTION")
    hp = steps.add_parser("hash-password", help="read a password (prompt, or stdin's first line) and print its scrypt hash")
    hp.add_argument("--scrypt-n", type=int, default=DEFAULT_SCRYPT_N, metavar="N", help=f"scrypt cost, a power of two (default {DEFAULT_SCRYPT_N})")
    steps.add_parser("hash-token", help="read a token (prompt, or stdin's first line) and print its hash")
    steps.add_parser("new-token", help="print a new random token and, on the next line, its hash for the users file")
    check = steps.add_parser("check", help="check a users file and list its users")
    check.add_argument("file", type=Path)

    # Listed here for --help; main() hands `bench ...` to broker.bench, imported only then.
    bench = commands.add_parser("bench", help="benchmarks with verified delivery (pybroker bench --help)", add_help=False)
    bench.add_argument("bench_args", nargs=argparse.REMAINDER)
    return parser


def _credential_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--token", default=os.environ.get("PYBROKER_TOKEN"), help="authentication token (default $PYBROKER_TOKEN)")
    parser.add_argument("--user", default=os.environ.get("PYBROKER_USER"), help="user name (default $PYBROKER_USER); the password comes from $PYBROKER_PASSWORD or a prompt")


def _connect(args: argparse.Namespace, **options: Any) -> Any:
    """client.connect() with the command's credentials (else the URL's user info)."""
    import client

    if args.user:
        password = os.environ.get("PYBROKER_PASSWORD")
        if password is None:
            password = getpass.getpass(f"password for {args.user}: ")
        return client.connect(
            args.url, name="pybroker-cli", user=args.user, password=password, ca_file=args.ca, **options
        )
    return client.connect(
        args.url, name="pybroker-cli", token=args.token or None, ca_file=args.ca, **options
    )


def _ca_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ca", default=DEFAULT_CA, metavar="FILE", help="verify the broker's TLS certificate against the CAs in this PEM file, and connect over TLS (default $PYBROKER_CA; pybrokers:// URLs without it use the system's CAs)")


def _add_limit_flags(serve: argparse.ArgumentParser) -> None:
    """Flags for every limit (README, "Limits"; protocol.md, "Limits")."""
    config, limits = Config(), Limits()
    group = serve.add_argument_group("limits (protocol.md, \"Limits\")")
    group.add_argument("--max-connections", type=_positive_int, default=config.max_connections, metavar="N", help=f"connections served at once; one more gets ERROR 108 (default {config.max_connections:,})")
    group.add_argument("--max-frame-bytes", type=_positive_int, default=limits.max_frame_bytes, metavar="N", help=f"largest frame body accepted, bounding a message's payload (default {limits.max_frame_bytes:,})")
    group.add_argument("--max-batch-messages", type=_positive_int, default=limits.max_batch_messages, metavar="N", help=f"messages per PUBLISH batch (default {limits.max_batch_messages:,})")
    group.add_argument("--max-topic-bytes", type=_positive_int, default=limits.max_topic_bytes, metavar="N", help=f"topic and pattern length in bytes, at most 65535 (default {limits.max_topic_bytes})")
    group.add_argument("--max-topic-depth", type=_positive_int, default=limits.max_topic_depth, metavar="N", help=f"tokens per topic or pattern (default {limits.max_topic_depth})")
    group.add_argument("--max-subscriptions", type=_positive_int, default=limits.max_subscriptions, metavar="N", help=f"active subscriptions per connection (default {limits.max_subscriptions:,})")
    group.add_argument("--max-inflight-publishes", type=_positive_int, default=limits.max_inflight_publishes, metavar="N", help=f"unanswered PUBLISH frames per connection before the broker stops reading it (default {limits.max_inflight_publishes:,})")
    group.add_argument("--max-pending-frame-bytes", type=_positive_int, default=None, metavar="N", help=f"bytes of frames still arriving that all connections together may hold beyond {FREE_BYTES // 1024} KiB each; when spent, connections that need more are not read until some frame completes; at least --max-frame-bytes (default {PENDING_FRAME_BUDGET_FRAMES} x --max-frame-bytes)")
    group.add_argument("--outbound-queue-bytes", type=_positive_int, default=config.outbound_queue_bytes, metavar="N", help=f"bytes queued for one connection before its subscriptions are served from the log and its reading pauses (default {config.outbound_queue_bytes:,})")
    group.add_argument("--handshake-timeout", type=_positive_seconds, default=config.handshake_timeout, metavar="S", help=f"seconds from connecting to HELLO (default {config.handshake_timeout:g})")
    group.add_argument("--idle-timeout", type=_seconds, default=config.idle_timeout, metavar="S", help=f"seconds without a frame from a client before a PING; as long again and it is closed with ERROR 107; 0 disables (default {config.idle_timeout:g})")
    group.add_argument("--inbox-grace", type=_seconds, default=config.inbox_grace, metavar="S", help=f"seconds a request/reply inbox outlives its owner's connection, for the same user to reclaim it on reconnect; 0: it goes with the connection (default {config.inbox_grace:g})")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return value


def _seconds(text: str) -> float:
    value = _duration(text)
    if value < 0 or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError(f"not a usable number of seconds: {text!r}")
    return value


def _positive_seconds(text: str) -> float:
    value = _seconds(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"must be more than 0: {text!r}")
    return value


def _duration(text: str) -> float:
    """Seconds, or a number with s/m/h/d."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        if text and text[-1] in units:
            return float(text[:-1]) * units[text[-1]]
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 3600, 90m, 12h, 7d)") from None


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    if words[:1] == ["bench"]:
        from .bench import main as bench_main

        return bench_main(words[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "serve":
            configure(args.log_level, args.log_format)
            try:
                return trio.run(_serve, args)
            except ValueError as exc:  # bad settings, users file, unsafe listen address
                parser.error(str(exc))
        if args.command == "auth":
            return _auth(args)
        configure("warning", "console")
        if args.command == "pub":
            return trio.run(_pub, args)
        if args.command == "topics":
            return trio.run(_topics, args)
        if args.command == "groups":
            return trio.run(_groups, args)
        return trio.run(_sub, args)
    except KeyboardInterrupt:
        return 130
    except OSError as exc:
        print(f"pybroker: {exc}", file=sys.stderr)
        return 1
    except BaseExceptionGroup as group:
        # Nurseries wrap what their tasks raise; report the plain cases plainly.
        leaves = list(_leaves(group))
        if all(isinstance(e, KeyboardInterrupt) for e in leaves):
            return 130
        if len(leaves) == 1 and isinstance(leaves[0], OSError):
            print(f"pybroker: {leaves[0]}", file=sys.stderr)
            return 1
        raise


def _leaves(group: BaseExceptionGroup[BaseException]) -> Iterator[BaseException]:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            yield from _leaves(exc)
        else:
            yield exc


# -- serve ----------------------------------------------------------------


async def _serve(args: argparse.Namespace) -> int:
    from .storage import DataDirLocked, StorageError
    from .server import Server

    overrides: dict[str, Any] = {}
    if args.name:
        overrides["server_name"] = args.name
    default = TopicSettings(
        fsync=args.fsync,
        fsync_interval_ms=args.fsync_interval_ms,
        segment_bytes=args.segment_bytes,
        retention_bytes=args.retention_bytes,
        retention_seconds=args.retention,
    )
    config = Config(
        host=args.host,
        port=args.port,
        http_host=args.http_host,
        http_port=None if args.no_http else _http_port(args),
        data_dir=args.data_dir,
        storage=args.storage,
        min_free_bytes=args.min_free_bytes,
        group_counts_fsync=args.group_counts_fsync,
        topic_settings=SettingsResolver.from_specs(default, args.topic),
        auth_file=args.auth,
        allow_anonymous_remote=args.allow_anonymous_remote,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        limits=Limits(
            max_frame_bytes=args.max_frame_bytes,
            max_batch_messages=args.max_batch_messages,
            max_topic_bytes=args.max_topic_bytes,
            max_topic_depth=args.max_topic_depth,
            max_subscriptions=args.max_subscriptions,
            max_inflight_publishes=args.max_inflight_publishes,
        ),
        max_connections=args.max_connections,
        max_pending_frame_bytes=args.max_pending_frame_bytes,
        outbound_queue_bytes=args.outbound_queue_bytes,
        handshake_timeout=args.handshake_timeout,
        idle_timeout=args.idle_timeout,
        inbox_grace=args.inbox_grace,
        **overrides,
    )
    # Here, not inside the nursery below, so a bad users file or an unsafe
    # address is a plain ValueError (a usage error), not an exception group.
    authenticator_for(config)
    log = get_logger()
    # Signals are caught before anything listens, so a SIGTERM at any moment
    # of start-up still means a clean shutdown.
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        try:
            # Locks the data directory and recovers the log.
            server = Server(config)
        except (DataDirLocked, StorageError) as exc:
            print(f"pybroker: {exc}", file=sys.stderr)
            return 1
        async with trio.open_nursery() as nursery:

            async def serve_then_stop_waiting() -> None:
                await server.serve()
                nursery.cancel_scope.cancel()  # stopped by itself

            nursery.start_soon(serve_then_stop_waiting)
            async for signum in signals:
                log.info("signal received, shutting down", signal=signal.Signals(signum).name)
                server.shutdown()
                break
    return 0


def _http_port(args: argparse.Namespace) -> int:
    if args.http_port is not None:
        return int(args.http_port)
    # Asking for a free TCP port (tests, several brokers on one machine)
    # asks for a free HTTP port too.
    return 0 if args.port == 0 else DEFAULT_HTTP_PORT


# -- auth -----------------------------------------------------------------


def _read_secret(what: str) -> str:
    """From a prompt on a terminal (asked twice), else stdin's first line:
    never from argv, where other users could see it in the process list."""
    if sys.stdin.isatty():
        first = getpass.getpass(f"{what}: ")
        if getpass.getpass(f"{what} again: ") != first:
            raise ValueError(f"the two {what}s differ")
        return first
    return sys.stdin.readline().rstrip("\r\n")


def _auth(args: argparse.Namespace) -> int:
    try:
        if args.auth_command == "hash-password":
            print(hash_password(_read_secret("password"), n=args.scrypt_n))
        elif args.auth_command == "hash-token":
            print(hash_token(_read_secret("token")))
        elif args.auth_command == "new-token":
            token = new_token()
            print(token)
            print(hash_token(token))
        else:
            users = Users.load(args.file)
            for user in users.by_name.values():
                kinds = [k for k, v in (("password", user.password), ("token", user.token_digest)) if v is not None]
                print(f"{user.name}: {' and '.join(kinds)}{', admin' if user.permissions.admin else ''}")
    except ValueError as exc:
        print(f"pybroker auth {args.auth_command}: {exc}", file=sys.stderr)
        return 1
    return 0


# -- pub / sub ------------------------------------------------------------


def _headers(pairs: list[str]) -> dict[str, str]:
    headers = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"pybroker pub: --header wants KEY=VALUE, got {pair!r}")
        headers[key] = value
    return headers


async def _pub(args: argparse.Namespace) -> int:
    import client

    headers = _headers(args.header) or None
    try:
        async with _connect(args) as c:
            if args.message != "-":
                ack = await c.publish(args.topic, args.message.encode(), headers)
                print(f"published to {ack.topic} at offset {ack.offset} ({ack.durability.name.lower()})")
                return 0
            pending = []
            for line in sys.stdin:
                pending.append(await c.send(args.topic, line.rstrip("\n").encode(), headers))
            await c.flush()
            acks = [await p.wait() for p in pending]
            if acks:
                print(f"published {len(acks)} messages to {args.topic}, offsets {acks[0].offset}..{acks[-1].offset}")
            else:
                print("nothing to publish (stdin was empty)")
            return 0
    except (client.BrokerError, client.ConnectionClosed, ValueError, ssl.SSLError) as exc:
        print(f"pybroker pub: {exc}", file=sys.stderr)
        return 1


def _format(msg: Any, as_json: bool) -> str:
    if as_json:
        try:
            payload: dict[str, str] = {"payload": msg.payload.decode("utf-8")}
        except UnicodeDecodeError:
            payload = {"payload_base64": base64.b64encode(msg.payload).decode()}
        return json.dumps(
            {
                "topic": msg.topic,
                "offset": msg.offset,
                "timestamp": msg.datetime.isoformat(),
                "headers": dict(msg.headers),
                **payload,
            }
        )
    text = msg.payload.decode("utf-8", "backslashreplace")
    headers = "".join(f" {k}={v}" for k, v in msg.headers.items())
    return f"{msg.topic} [{msg.offset}]{headers} {text}"


async def _sub(args: argparse.Namespace) -> int:
    import client

    start: Any = args.start
    if args.from_offset is not None:
        start = args.from_offset
    elif args.since:
        since = _dt.datetime.fromisoformat(args.since)
        start = since if since.tzinfo else since.astimezone()
    try:
        async with _connect(args, reconnect=args.reconnect) as c:
            async with c.subscribe(args.pattern, start=start, group=args.group) as sub:
                seen = 0
                async for msg in sub:
                    print(_format(msg, args.json), flush=True)
                    if msg.is_group_message:
                        await msg.ack()
                    seen += 1
                    if args.count and seen >= args.count:
                        break
        return 0
    except (client.BrokerError, client.ConnectionClosed, ValueError, ssl.SSLError) as exc:
        print(f"pybroker sub: {exc}", file=sys.stderr)
        return 1


async def _groups(args: argparse.Namespace) -> int:
    import client

    if args.action != "list" and not args.name:
        print(f"pybroker groups {args.action}: a group NAME is needed", file=sys.stderr)
        return 2
    try:
        async with _connect(args) as c:
            doc = await c.groups(args.action, args.name)
    except (client.BrokerError, client.ConnectionClosed, ValueError, ssl.SSLError) as exc:
        print(f"pybroker groups: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(doc, indent=2))
    elif args.action == "delete":
        print(f"deleted group {doc['deleted']}")
    else:
        summaries = doc["groups"] if args.action == "list" else [doc]
        if not summaries:
            print("no groups")
        for g in summaries:
            print(
                f"{g['group']}  pattern={g['pattern']}  members={g['members']}  "
                f"pending={g['pending']}  delivered={g['delivered']}  "
                f"redelivered={g['redelivered']}  dead_lettered={g['dead_lettered']}"
            )
            if args.action == "inspect":
                for topic, t in sorted(g["topics"].items()):
                    print(f"  {topic}: next offset {t['cursor']}, pending {t['pending']}")
    return 0


async def _topics(args: argparse.Namespace) -> int:
    import client

    try:
        async with _connect(args) as c:
            infos = await c.topics(args.pattern)
    except (client.BrokerError, client.ConnectionClosed, ValueError, ssl.SSLError) as exc:
        print(f"pybroker topics: {exc}", file=sys.stderr)
        return 1
    if args.json:
        for info in infos:
            print(json.dumps(
                {
                    "topic": info.topic,
                    "first_offset": info.first_offset,
                    "next_offset": info.next_offset,
                    "retained_bytes": info.retained_bytes,
                    "subscriptions": info.subscriptions,
                }
            ))
        return 0
    if not infos:
        print("no topics")
        return 0
    width = max(len(i.topic) for i in infos)
    print(f"{'TOPIC':<{width}}  {'FIRST':>10}  {'NEXT':>10}  {'BYTES':>12}  SUBS")
    for i in infos:
        print(f"{i.topic:<{width}}  {i.first_offset:>10}  {i.next_offset:>10}  {i.retained_bytes:>12}  {i.subscriptions}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
