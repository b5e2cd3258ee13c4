"""``pybroker serve``: its flags, the ``Config`` they describe, and running the
server until SIGINT or SIGTERM."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from typing import Any

import trio

from ..auth import authenticator_for
from ..config import DEFAULT_HOST, DEFAULT_HTTP_PORT, DEFAULT_PORT, PENDING_FRAME_BUDGET_FRAMES, Config, HttpSettings, Limits, origin_error
from ..framebudget import FREE_BYTES
from ..logs import LEVELS, get_logger
from ..storage.settings import FSYNC_MODES, SettingsResolver, TopicSettings
from .flags import Commands, command_parser, duration, positive_int, positive_seconds, seconds


def add_parser(commands: Commands[argparse.ArgumentParser]) -> None:
    serve = commands.add_parser("serve", help="run the broker")
    serve.add_argument("--host", default=DEFAULT_HOST, help=f"address to bind (default {DEFAULT_HOST})")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"TCP port (default {DEFAULT_PORT}; 0 picks a free one)")
    http = serve.add_mutually_exclusive_group()
    http.add_argument("--http-port", type=int, default=None, metavar="N", help=f"HTTP port for health, metrics, the JSON API and the dashboard (default {DEFAULT_HTTP_PORT}, or a free one with --port 0; 0 picks a free one)")
    http.add_argument("--no-http", action="store_true", help="do not serve HTTP")
    serve.add_argument("--http-host", default=None, help="address to bind for HTTP (default: --host)")
    serve.add_argument("--http-cors-origin", action="append", default=[], type=_origin, metavar="ORIGIN", help="let pages from ORIGIN (e.g. https://app.example.com, or * for any) call the HTTP API and open event streams (CORS); repeatable (default: none)")
    serve.add_argument("--data-dir", type=Path, default=Path("pybroker-data"), help="data directory (default ./pybroker-data)")
    serve.add_argument("--name", default=None, help="server name announced to clients (default: host name)")
    serve.add_argument("--storage", choices=("file", "memory"), default="file", help="file: the durable log in --data-dir (default); memory: nothing on disk")
    serve.add_argument("--cluster", default=None, metavar="etcd://HOST:PORT[,HOST:PORT][/PREFIX]", help="cluster mode (docs/cluster.md): share topics with the other brokers of this etcd cluster; needs --object-store and the cluster extra")
    serve.add_argument("--object-store", default=None, metavar="s3://HOST:PORT/BUCKET[/PREFIX]", help="cluster mode: the S3-compatible bucket that holds the topics' data (credentials from AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, if set)")
    serve.add_argument("--advertise", default=None, metavar="HOST:PORT", help="cluster mode: the address other nodes send this node's publishers to (default: the bound address)")
    serve.add_argument("--cluster-lease-ttl", type=int, default=Config().cluster_lease_ttl, metavar="S", help=f"cluster mode: seconds of this node's etcd lease, and so how long its topics wait after it crashes before another node takes them over (default {Config().cluster_lease_ttl}, at least 2)")
    serve.add_argument("--cluster-index-keep", type=int, default=Config().cluster_index_keep, metavar="N", help=f"cluster mode: the newest N entries of each topic's index in etcd are left as they are; the topic's owner merges older ones into larger objects (default {Config().cluster_index_keep})")
    serve.add_argument("--cluster-index-fan-in", type=int, default=Config().cluster_index_fan_in, metavar="N", help=f"cluster mode: index entries merged into one at a time, 2 to 120 (default {Config().cluster_index_fan_in})")
    serve.add_argument("--fsync", choices=FSYNC_MODES, default="always", help="always: acks wait for the fsync covering them (group commit, default); interval: fsync every --fsync-interval-ms; never: leave it to the OS")
    serve.add_argument("--fsync-interval-ms", type=int, default=200, metavar="MS", help="with --fsync interval: milliseconds between fsyncs (default 200)")
    serve.add_argument("--group-counts-fsync", action="store_true", help="consumer groups: fsync each delivery's count before sending it, so max_deliver holds across power loss too (default: written to the OS first, which survives kill -9; costs group throughput, see benchmarks/README.md)")
    serve.add_argument("--min-free-bytes", type=int, default=0, metavar="N", help="refuse publishes (STORAGE_FULL) while the data directory's file system has fewer than N bytes free, before it is completely full (default 0: off)")
    serve.add_argument("--segment-bytes", type=int, default=64 * 1024 * 1024, metavar="N", help="roll segments at this size (default 64 MiB)")
    serve.add_argument("--retention-bytes", type=positive_int, default=None, metavar="N", help=f"per topic: delete whole old segments beyond N bytes (default: keep everything); with --storage memory, drop the oldest batches beyond N bytes (default {Config().memory_retention_bytes:,})")
    serve.add_argument("--retention", type=duration, default=None, metavar="AGE", help="per topic: delete whole segments older than AGE (e.g. 3600, 90m, 12h, 7d)")
    serve.add_argument("--topic", action="append", default=[], metavar="PATTERN:KEY=VALUE,...", help="settings for matching topics, e.g. 'metrics.>:fsync=never,retention_seconds=3600' (first match wins)")
    serve.add_argument("--auth", type=Path, default=None, metavar="FILE", help="users file (TOML): clients must authenticate and their permissions apply (README, 'Authentication and permissions')")
    serve.add_argument("--allow-anonymous-remote", action="store_true", help="without --auth, listen on a non-loopback address anyway (anyone reaching it may publish and subscribe)")
    serve.add_argument("--tls-cert", type=Path, default=None, metavar="FILE", help="serve TLS on the TCP and HTTP ports with this PEM certificate chain (clients use pybrokers://)")
    serve.add_argument("--tls-key", type=Path, default=None, metavar="FILE", help="the certificate's PEM private key, unencrypted (default: read from --tls-cert)")
    _add_limit_flags(serve)
    serve.add_argument("--log-level", choices=LEVELS, default="info", help="the least severe log records written (default info)")
    serve.add_argument("--log-format", choices=("console", "json"), default="console", help="console: readable lines (default); json: one JSON object per line, for log collectors")


def serve_parser() -> argparse.ArgumentParser:
    """The ``pybroker`` parser with ``serve`` as its only command: for
    ``pybroker bench``, which reads its ``--broker-args`` the way the
    ``pybroker serve`` it starts will (same usage lines, same errors)."""
    parser, commands = command_parser()
    add_parser(commands)
    return parser


def _add_limit_flags(serve: argparse.ArgumentParser) -> None:
    """Flags for every limit (README, "Limits"; protocol.md, "Limits")."""
    config, limits = Config(), Limits()
    group = serve.add_argument_group("limits (protocol.md, \"Limits\")")
    group.add_argument("--max-connections", type=positive_int, default=config.max_connections, metavar="N", help=f"connections served at once; one more gets ERROR 108 (default {config.max_connections:,})")
    group.add_argument("--max-frame-bytes", type=positive_int, default=limits.max_frame_bytes, metavar="N", help=f"largest frame body accepted, bounding a message's payload (default {limits.max_frame_bytes:,})")
    group.add_argument("--max-batch-messages", type=positive_int, default=limits.max_batch_messages, metavar="N", help=f"messages per PUBLISH batch (default {limits.max_batch_messages:,})")
    group.add_argument("--max-topic-bytes", type=positive_int, default=limits.max_topic_bytes, metavar="N", help=f"topic and pattern length in bytes, at most 65535 (default {limits.max_topic_bytes})")
    group.add_argument("--max-topic-depth", type=positive_int, default=limits.max_topic_depth, metavar="N", help=f"tokens per topic or pattern (default {limits.max_topic_depth})")
    group.add_argument("--max-subscriptions", type=positive_int, default=limits.max_subscriptions, metavar="N", help=f"active subscriptions per connection (default {limits.max_subscriptions:,})")
    group.add_argument("--max-inflight-publishes", type=positive_int, default=limits.max_inflight_publishes, metavar="N", help=f"unanswered PUBLISH frames per connection before the broker stops reading it (default {limits.max_inflight_publishes:,})")
    group.add_argument("--max-pending-frame-bytes", type=positive_int, default=None, metavar="N", help=f"bytes of frames still arriving that all connections together may hold beyond {FREE_BYTES // 1024} KiB each; when spent, connections that need more are not read until some frame completes; at least --max-frame-bytes (default {PENDING_FRAME_BUDGET_FRAMES} x --max-frame-bytes)")
    group.add_argument("--outbound-queue-bytes", type=positive_int, default=config.outbound_queue_bytes, metavar="N", help=f"bytes queued for one connection before its subscriptions are served from the log and its reading pauses (default {config.outbound_queue_bytes:,})")
    group.add_argument("--handshake-timeout", type=positive_seconds, default=config.handshake_timeout, metavar="S", help=f"seconds from connecting to HELLO (default {config.handshake_timeout:g})")
    group.add_argument("--idle-timeout", type=seconds, default=config.idle_timeout, metavar="S", help=f"seconds without a frame from a client before a PING; as long again and it is closed with ERROR 107; 0 disables (default {config.idle_timeout:g})")
    group.add_argument("--dedup-window", type=positive_seconds, default=config.dedup_window, metavar="AGE", help=f"exactly-once publishing: how long each topic remembers the msg-id of a stored batch, so that a resend within it is not stored twice (default {config.dedup_window:g} s; e.g. 90s, 10m)")
    group.add_argument("--dedup-max-ids", type=positive_int, default=config.dedup_max_ids, metavar="N", help=f"exactly-once publishing: at most N msg-ids remembered per topic, the oldest forgotten first (default {config.dedup_max_ids:,})")
    group.add_argument("--max-delay", type=positive_seconds, default=config.max_delay, metavar="AGE", help=f"delayed delivery: the furthest ahead a message may be scheduled (default {config.max_delay / 86400:g} days; e.g. 1h, 30d)")
    group.add_argument("--inbox-grace", type=seconds, default=config.inbox_grace, metavar="S", help=f"seconds a request/reply inbox outlives its owner's connection, for the same user to reclaim it on reconnect; 0: it goes with the connection (default {config.inbox_grace:g})")


def config_from(args: argparse.Namespace) -> Config:
    """The broker's ``Config`` from parsed ``serve`` flags (ValueError for bad
    ``--topic`` settings)."""
    overrides: dict[str, Any] = {}
    if args.name:
        overrides["server_name"] = args.name
    if args.storage == "memory" and args.retention_bytes is not None:
        # Memory has to have a bound: the flag moves it (protocol.md, "Limits").
        overrides["memory_retention_bytes"] = args.retention_bytes
    default = TopicSettings(
        fsync=args.fsync,
        fsync_interval_ms=args.fsync_interval_ms,
        segment_bytes=args.segment_bytes,
        retention_bytes=args.retention_bytes,
        retention_seconds=args.retention,
    )
    return Config(
        host=args.host,
        port=args.port,
        http_host=args.http_host,
        http_port=None if args.no_http else _http_port(args),
        http=HttpSettings(cors_origins=tuple(args.http_cors_origin)),
        data_dir=args.data_dir,
        storage=args.storage,
        cluster=args.cluster,
        object_store=args.object_store,
        advertise=args.advertise,
        cluster_lease_ttl=args.cluster_lease_ttl,
        cluster_index_keep=args.cluster_index_keep,
        cluster_index_fan_in=args.cluster_index_fan_in,
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
        dedup_window=args.dedup_window,
        dedup_max_ids=args.dedup_max_ids,
        max_delay=args.max_delay,
        **overrides,
    )


def _origin(text: str) -> str:
    problem = origin_error(text)
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return text


def _http_port(args: argparse.Namespace) -> int:
    if args.http_port is not None:
        return int(args.http_port)
    # Asking for a free TCP port (tests, several brokers on one machine)
    # asks for a free HTTP port too.
    return 0 if args.port == 0 else DEFAULT_HTTP_PORT


async def serve(args: argparse.Namespace) -> int:
    """Run the broker until a signal; ValueError (a usage error) for bad
    settings, a bad users file or an unsafe listen address."""
    # Imported here so that pub, sub and the other client commands, which
    # load this module too, start without loading the server.
    from ..storage import DataDirLocked, StorageError
    from ..server import Server

    config = config_from(args)
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
