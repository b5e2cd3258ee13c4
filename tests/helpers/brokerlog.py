"""The in-process broker's log, captured, and failing the test on errors."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from typing import Any

import structlog
import structlog.testing


def _exception_now(logger: Any, method: str, event_dict: MutableMapping[str, Any]) -> Any:
    """Processor: replace ``exc_info=True`` by the exception being handled."""
    if event_dict.get("exc_info") is True:
        event_dict["exc_info"] = sys.exc_info()[1]
    return event_dict


def describe(exc: BaseException | None) -> str:
    if isinstance(exc, BaseExceptionGroup):
        return " + ".join(describe(e) for e in exc.exceptions)
    return repr(exc)


@contextmanager
def broker_log() -> Iterator[list[MutableMapping[str, Any]]]:
    """Capture the broker's log, info records included (conftest.py filters
    them out otherwise); fail on anything at error level or above and on any
    connection closed by an internal error (an unexpected exception in a
    connection is logged as one)."""
    wrapper = structlog.get_config()["wrapper_class"]
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.INFO))
    try:
        with structlog.testing.capture_logs(processors=[_exception_now]) as logs:
            yield logs
    finally:
        structlog.configure(wrapper_class=wrapper)
    bad = [
        f"{e.get('event')!r}: {describe(e.get('exc_info'))} (client {e.get('client')!r})"
        for e in logs
        if e.get("log_level") in ("error", "critical", "exception") or e.get("reason") == "internal error"
    ]
    assert not bad, f"the broker logged {len(bad)} errors: {bad[:5]}"

