"""Broker settings, with the defaults `pybroker serve` uses."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Literal

import attrs

from pybroker.protocol import (
    DEFAULT_MAX_FRAME_BYTES,
    DEFAULT_MAX_TOPIC_BYTES,
    DEFAULT_MAX_TOPIC_DEPTH,
)

from .storage.settings import SettingsResolver

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7420
DEFAULT_HTTP_PORT = 7421


#: The default budget for frames in progress, in largest frames: a few
#: uploads of the largest size at once, and memory that follows the limit.
PENDING_FRAME_BUDGET_FRAMES = 4

#: A limit of 0 would refuse everything, or (max_inflight_publishes) stop
#: reading every connection for good: each must be at least 1.
_AT_LEAST_ONE = attrs.validators.ge(1)


@attrs.frozen
class Limits:
    """Limits announced in WELCOME and enforced by every session."""

    max_frame_bytes: int = attrs.field(default=DEFAULT_MAX_FRAME_BYTES, validator=_AT_LEAST_ONE)
    max_batch_messages: int = attrs.field(default=100_000, validator=_AT_LEAST_ONE)
    #: At most 65535: topics travel as str16.
    max_topic_bytes: int = attrs.field(
        default=DEFAULT_MAX_TOPIC_BYTES, validator=[_AT_LEAST_ONE, attrs.validators.le(0xFFFF)]
    )
    max_topic_depth: int = attrs.field(default=DEFAULT_MAX_TOPIC_DEPTH, validator=_AT_LEAST_ONE)
    max_subscriptions: int = attrs.field(default=1024, validator=_AT_LEAST_ONE)
    #: PUBLISH frames wanting a PUBACK that the server has read and not yet
    #: answered (waiting for their fsync, say). At the limit the server stops
    #: reading the connection until answers go out: backpressure, no error.
    max_inflight_publishes: int = attrs.field(default=1024, validator=_AT_LEAST_ONE)

    def announced(self) -> dict[str, int]:
        return attrs.asdict(self)


def origin_error(origin: str) -> str | None:
    """Why ``origin`` is not something ``--http-cors-origin`` takes: ``*``
    or an origin as browsers send it (``scheme://host[:port]``, no path)."""
    if origin == "*":
        return None
    scheme, sep, rest = origin.partition("://")
    if not sep or scheme.lower() not in ("http", "https"):
        return f"{origin!r} is not an origin: expected http://HOST[:PORT], https://HOST[:PORT] or *"
    if not rest or any(c in rest for c in "/?#@ \t") or not rest.isascii():
        return f"{origin!r} is not an origin: scheme://host[:port] only, no path or trailing slash"
    return None


def _origins(value: object) -> tuple[str, ...]:
    origins = tuple(str(o) for o in value) if isinstance(value, (list, tuple)) else (str(value),)
    for origin in origins:
        problem = origin_error(origin)
        if problem is not None:
            raise ValueError(problem)
    # Browsers send scheme and host in lower case.
    return tuple(o.lower() for o in origins)


@attrs.frozen
class HttpSettings:
    """Limits and timeouts of the HTTP side (broker/http)."""

    #: Larger request bodies get 413.
    max_body_bytes: int = 1024 * 1024
    #: Request line plus headers (h11's max_incomplete_event_size); 431 beyond.
    max_header_bytes: int = 16 * 1024
    #: A request must arrive whole within this many seconds of its first
    #: byte (or of the connection opening); else 408 and close.
    request_timeout: float = 10.0
    #: An idle keep-alive connection is closed after this many seconds.
    keepalive_timeout: float = 30.0
    #: A response write (or one SSE event) must be taken by the peer in time.
    write_timeout: float = 30.0
    #: Connections beyond this get 503 and are closed.
    max_connections: int = 1024
    #: Seconds between SSE comment lines that keep idle streams alive.
    sse_keepalive: float = 15.0
    #: Origins whose pages may call the JSON API and open event streams
    #: (CORS, broker/http/cors.py); ``*`` for any. Empty: none.
    cors_origins: tuple[str, ...] = attrs.field(default=(), converter=_origins)


@attrs.frozen
class Config:
    host: str = DEFAULT_HOST
    #: 0 picks a free port (tests); the bound port is on ``Server.port``.
    port: int = DEFAULT_PORT
    data_dir: Path = Path("pybroker-data")
    #: ``file``: the durable log under data_dir; ``memory``: nothing on disk.
    storage: Literal["file", "memory"] = "file"
    #: Cluster mode (docs/cluster.md): ``etcd://host:port[,host:port][/prefix]``
    #: and ``s3://host:port/bucket[/prefix]``; both or neither. Topics then
    #: live in the object store, ordered and owned through etcd.
    cluster: str | None = None
    object_store: str | None = None
    #: The ``host:port`` other nodes name in NOT_OWNER answers (default:
    #: the bound address).
    advertise: str | None = None
    #: This node's name in the cluster (default: host name and address).
    node_name: str = ""
    #: Seconds of the member lease: how long a crashed owner's topics wait
    #: for another node to take them over.
    cluster_lease_ttl: int = attrs.field(default=10, validator=attrs.validators.ge(2))
    #: Index compaction (docs/cluster.md §13): the newest entries of each
    #: topic's index left as they are, and the entries merged at a time.
    cluster_index_keep: int = attrs.field(default=256, validator=attrs.validators.ge(1))
    cluster_index_fan_in: int = attrs.field(
        default=100, validator=[attrs.validators.ge(2), attrs.validators.le(120)]
    )
    #: fsync policy, retention and segment size, per topic pattern.
    topic_settings: SettingsResolver = SettingsResolver()
    retention_check_seconds: float = 5.0
    #: Consumer groups: wait for an fsync covering each delivery's saved count
    #: before sending it (counts then survive power loss too). Off: the count
    #: is written to the OS before sending (survives kill -9 and any crash
    #: of the broker) and fsynced within persist interval (200 ms).
    group_counts_fsync: bool = False
    #: Refuse publishes (STORAGE_FULL) once the data directory's file system
    #: has fewer free bytes than this; 0: only when it is really full.
    min_free_bytes: int = attrs.field(default=0, validator=attrs.validators.ge(0))
    server_name: str = attrs.field(factory=socket.gethostname)
    limits: Limits = Limits()
    #: Bound on the bytes queued for one connection before its subscriptions
    #: are switched to catching up from the log (protocol.md, "Flow control").
    #: Four times the default frame limit: with batches as large as a frame,
    #: a subscriber keeps batches in flight while the next ones queue,
    #: instead of reading every other one back from the log. The batches
    #: queued for many subscribers are the same bytes objects, shared.
    outbound_queue_bytes: int = attrs.field(default=16 * 1024 * 1024, validator=_AT_LEAST_ONE)
    #: Bytes of frames in progress (arrived, not yet whole) that all
    #: connections together may hold beyond each one's free allowance
    #: (broker/framebudget.py); when spent, connections needing more stop
    #: being read. None: PENDING_FRAME_BUDGET_FRAMES x max_frame_bytes.
    #: At least max_frame_bytes, so that the largest frame can arrive.
    max_pending_frame_bytes: int | None = attrs.field(default=None)
    #: Bytes kept per topic by the in-memory store (storage="memory").
    memory_retention_bytes: int = 64 * 1024 * 1024
    #: Seconds from accepting a connection to its HELLO; then ERROR 104.
    handshake_timeout: float = attrs.field(default=10.0, validator=attrs.validators.gt(0))
    #: Seconds without a complete frame from a client before the server
    #: PINGs it; as long again without one and it gets ERROR 107 (fatal).
    #: 0 disables (protocol.md, "Liveness").
    idle_timeout: float = attrs.field(default=60.0, validator=attrs.validators.ge(0))
    #: Connections served at once (including those still in their
    #: handshake); one more gets ERROR 108 (fatal) and is closed.
    max_connections: int = attrs.field(default=10_000, validator=_AT_LEAST_ONE)
    #: Seconds a request/reply inbox outlives its owner's connection, for
    #: the same user to reclaim it on reconnect (broker/inboxes.py); 0: it
    #: goes with the connection.
    inbox_grace: float = attrs.field(default=30.0, validator=attrs.validators.ge(0))
    #: Exactly-once publishing (flag DEDUP): how long a topic remembers the
    #: msg-id of each batch stored, and at most how many (the oldest go).
    dedup_window: float = attrs.field(default=120.0, validator=attrs.validators.gt(0))
    dedup_max_ids: int = attrs.field(default=100_000, validator=attrs.validators.ge(1))
    #: Delayed delivery (PUBLISH flag DELAYED): the furthest a batch may be
    #: scheduled ahead, in seconds (announced in WELCOME as max_delay_ms).
    max_delay: float = attrs.field(default=366 * 86400.0, validator=attrs.validators.gt(0))
    #: How long a graceful shutdown waits for connections to flush.
    shutdown_grace: float = 5.0
    #: The HTTP side (health, metrics, JSON API, SSE, dashboard). None: the
    #: same host as the TCP listener. Port 0 picks a free port (the bound
    #: one is on ``Server.http_port``); None or a negative port disables it.
    http_host: str | None = None
    http_port: int | None = DEFAULT_HTTP_PORT
    http: HttpSettings = HttpSettings()
    #: The users file (broker/auth.py): every TCP connection and HTTP
    #: request (but /healthz and /readyz) must authenticate, and each user's
    #: permissions apply. None: no authentication, everything allowed.
    auth_file: Path | None = None
    #: Without auth_file the broker refuses to listen on a non-loopback
    #: address (TCP or HTTP) unless this is set.
    allow_anonymous_remote: bool = False
    #: TLS for both listeners (broker/tls.py): a PEM certificate chain and its
    #: private key. Without a key file the key is read from the certificate
    #: file. None: plain TCP and HTTP.
    tls_cert: Path | None = None
    tls_key: Path | None = None

    @max_pending_frame_bytes.validator
    def _check_pending_frame_bytes(self, _attribute: object, value: int | None) -> None:
        if value is not None and value < self.limits.max_frame_bytes:
            raise ValueError(
                f"max_pending_frame_bytes ({value}) must be at least max_frame_bytes "
                f"({self.limits.max_frame_bytes}): the largest frame could never arrive"
            )

    @property
    def pending_frame_bytes(self) -> int:
        """max_pending_frame_bytes, or its default for this frame size."""
        if self.max_pending_frame_bytes is not None:
            return self.max_pending_frame_bytes
        return PENDING_FRAME_BUDGET_FRAMES * self.limits.max_frame_bytes
