"""Per-topic storage settings: fsync policy, retention, segment size."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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


#: What TOPICS set may change while the broker runs (protocol.md, "TOPICS"):
#: retention applies at the next retention check, segment_bytes at the next
#: roll. fsync modes are fixed for a run (the commit path sorts by them).
RUNTIME_KEYS = ("retention_bytes", "retention_seconds", "segment_bytes")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
#: Shorter names (``pybroker topics set NAME retention=7d``, as serve's --retention).
_ALIASES = {"retention": "retention_seconds"}


def parse_runtime_settings(changes: Mapping[str, str]) -> dict[str, int | float | None]:
    """TOPICS set's ``key=value`` pairs as TopicSettings fields; ValueError
    names what is wrong. ``none`` lifts a retention limit; retention_seconds
    takes s/m/h/d suffixes."""
    out: dict[str, int | float | None] = {}
    if not changes:
        raise ValueError(f"nothing to set (known: {', '.join(RUNTIME_KEYS)})")
    for key, text in changes.items():
        key = _ALIASES.get(key, key)
        if key not in RUNTIME_KEYS:
            fixed = " (fixed while the broker runs: pybroker serve --topic)" if key in _KEYS else ""
            raise ValueError(f"{key!r} cannot be set at run time{fixed}; known: {', '.join(RUNTIME_KEYS)}")
        value = text.strip()
        if key != "segment_bytes" and value.lower() in ("none", ""):
            out[key] = None
            continue
        try:
            if key == "retention_seconds":
                number = float(value[:-1]) * _UNITS[value[-1]] if value[-1:] in _UNITS else float(value)
                if not number > 0 or number == float("inf"):
                    raise ValueError
                out[key] = number
            else:
                whole = int(value)
                if whole < 1:
                    raise ValueError
                out[key] = whole
        except (ValueError, IndexError):
            raise ValueError(f"{key}: not a usable value: {text!r}") from None
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
