"""Broker settings, with the defaults `pybroker serve` uses."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Literal

import attrs

from client.protocol import DEFAULT_MAX_FRAME_BYTES
from client.protocol.subjects import DEFAULT_MAX_TOPIC_BYTES, DEFAULT_MAX_TOPIC_DEPTH

from .log.settings import SettingsResolver

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7420


@attrs.frozen
class Limits:
    """Limits announced in WELCOME and enforced by every session."""

    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    max_batch_messages: int = 100_000
    max_topic_bytes: int = DEFAULT_MAX_TOPIC_BYTES
    max_topic_depth: int = DEFAULT_MAX_TOPIC_DEPTH
    max_subscriptions: int = 1024

    def announced(self) -> dict[str, int]:
        return attrs.asdict(self)


@attrs.frozen
class Config:
    host: str = DEFAULT_HOST
    #: 0 picks a free port (tests); the bound port is on ``Server.port``.
    port: int = DEFAULT_PORT
    data_dir: Path = Path("pybroker-data")
    #: ``file``: the durable log under data_dir; ``memory``: nothing on disk.
    storage: Literal["file", "memory"] = "file"
    #: fsync policy, retention and segment size, per topic pattern.
    topic_settings: SettingsResolver = SettingsResolver()
    retention_check_seconds: float = 5.0
    server_name: str = attrs.field(factory=socket.gethostname)
    limits: Limits = Limits()
    #: Bound on the bytes queued for one connection before its subscriptions
    #: are switched to catching up from the log (protocol.md, "Flow control").
    outbound_queue_bytes: int = 4 * 1024 * 1024
    #: Bytes kept per topic by the in-memory store (storage="memory").
    memory_retention_bytes: int = 64 * 1024 * 1024
    handshake_timeout: float = 10.0
    #: How long a graceful shutdown waits for connections to flush.
    shutdown_grace: float = 5.0
