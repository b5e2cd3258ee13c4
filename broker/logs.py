"""structlog configuration: console lines for people, JSON lines for machines."""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

LEVELS = ("debug", "info", "warning", "error")


def configure(level: str = "info", fmt: str = "console", stream: Any = None) -> None:
    """Configure structlog for the process (the CLI calls this once)."""
    if level not in LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LEVELS)}")
    if fmt not in ("console", "json"):
        raise ValueError("log format must be 'console' or 'json'")
    renderer: Any
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(stream or sys.stderr),
        cache_logger_on_first_use=False,
    )
    _route_client_records(level, renderer, stream or sys.stderr)


class _ClientRecords(logging.StreamHandler):  # type: ignore[type-arg]
    """The handler configure() puts on the stdlib ``pybroker`` logger."""


def _route_client_records(level: str, renderer: Any, stream: Any) -> None:
    """The client library (``pybroker.connection``, used by ``pybroker sub``,
    ``pub``, the bench) logs through stdlib logging: in this process its
    records come out in the same format and at the same level as the
    broker's own. Calling configure() again replaces the handler."""
    handler = _ClientRecords(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
            foreign_pre_chain=[
                structlog.stdlib.add_log_level,
                structlog.stdlib.add_logger_name,
                structlog.processors.TimeStamper(fmt="iso", utc=True),
            ],
        )
    )
    logger = logging.getLogger("pybroker")
    for old in [h for h in logger.handlers if isinstance(h, _ClientRecords)]:
        logger.removeHandler(old)
    logger.addHandler(handler)
    logger.setLevel(logging.getLevelNamesMapping()[level.upper()])


def get_logger(**bound: Any) -> Any:
    return structlog.get_logger("pybroker").bind(**bound)
