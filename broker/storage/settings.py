"""Per-topic storage settings: fsync policy, retention, segment size."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import attrs

from pybroker.protocol import matches, pattern_error

FsyncMode = Literal["always", "interval", "never"]
FSYNC_MODES: tuple[FsyncMode, ...] = ("always", "interval", "never")


@attrs.frozen
class TopicSettings:
    #: ``always``: group commit, acks wait for the fsync that covers them;
    #: ``interval``: fsync every ``fsync_interval_ms``, acks mean "written to
    #: the OS"; ``never``: the OS decides when to write back.
    fsync: FsyncMode = "always"
    fsync_interval_ms: int = 200
    segment_bytes: int = 64 * 1024 * 1024
    #: Whole old segments are deleted once a topic holds more than this
    #: (None: no limit). The active segment is never deleted.
    retention_bytes: int | None = None
    #: ... or once their newest message is older than this many seconds.
    retention_seconds: float | None = None

    def __attrs_post_init__(self) -> None:
        if self.fsync not in FSYNC_MODES:
            raise ValueError(f"fsync must be one of {', '.join(FSYNC_MODES)}, not {self.fsync!r}")
        if self.fsync_interval_ms < 1:
            raise ValueError("fsync_interval_ms must be at least 1")
        if self.segment_bytes < 1024:
            raise ValueError("segment_bytes must be at least 1024")


_KEYS = {
    "fsync": str,
    "fsync_interval_ms": int,
    "segment_bytes": int,
    "retention_bytes": int,
    "retention_seconds": float,
}


def parse_overrides(spec: str) -> dict[str, object]:
    """``key=value,key=value`` -> a dict of TopicSettings fields."""
    out: dict[str, object] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        key, sep, value = item.partition("=")
        if not sep or key not in _KEYS:
            raise ValueError(f"unknown topic setting {item!r}; known: {', '.join(_KEYS)}")
        out[key] = _KEYS[key](value)
    return out


@attrs.frozen
class SettingsResolver:
    """The default settings, overridden by the first matching pattern."""

    default: TopicSettings = TopicSettings()
    overrides: Sequence[tuple[str, TopicSettings]] = ()

    @classmethod
    def from_specs(cls, default: TopicSettings, specs: Sequence[str]) -> SettingsResolver:
        """Specs look like ``PATTERN:key=value,key=value`` (CLI ``--topic``)."""
        overrides = []
        for spec in specs:
            pattern, sep, rest = spec.partition(":")
            problem = pattern_error(pattern)
            if not sep or problem:
                raise ValueError(f"--topic wants PATTERN:key=value,...; {problem or spec!r}")
            overrides.append((pattern, attrs.evolve(default, **parse_overrides(rest))))  # type: ignore[arg-type]
        return cls(default, tuple(overrides))

    def __call__(self, topic: str) -> TopicSettings:
        for pattern, settings in self.overrides:
            if matches(pattern, topic):
                return settings
        return self.default
