"""A blocking Server-Sent Events reader (used from a thread) that keeps the
last event id as a browser's EventSource does: any block's ``id:`` field,
events or not (the HTML spec)."""

from __future__ import annotations

import http.client
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from helpers.http import in_thread

TIMEOUT = 10.0


class EventSourceReader:
    """A blocking SSE reader (use from a thread) that tracks the last event
    id as a browser's EventSource does."""

    def __init__(self, port: int, path: str, last_event_id: str | None = None) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
        headers = {} if last_event_id is None else {"last-event-id": last_event_id}
        self.conn.request("GET", path, headers=headers)
        self.resp = self.conn.getresponse()
        self.status = self.resp.status
        self.last_event_id = last_event_id or ""

    def event(self) -> dict[str, Any] | None:
        """The next event with data: {"event", "data"}; None at EOF."""
        fields: dict[str, str] = {}
        for _ in range(100_000):
            line = self.resp.readline()
            if not line:
                return None
            text = line.decode("utf-8").rstrip("\r\n")
            if text:
                if not text.startswith(":"):
                    name, _, value = text.partition(":")
                    value = value[1:] if value.startswith(" ") else value
                    if name == "id":
                        self.last_event_id = value
                    fields[name] = value
                continue
            if "data" in fields:
                return {"event": fields.get("event", "message"), "data": json.loads(fields["data"])}
            fields = {}
        raise AssertionError("no event in 100000 lines")

    def opening(self) -> None:
        """Read the stream's first block (retry, a comment, for a pattern an id)."""
        for _ in range(100):
            text = self.resp.readline().decode("utf-8").rstrip("\r\n")
            if not text:
                return
            if text.startswith("id:"):
                self.last_event_id = text[3:].strip()
        raise AssertionError("no end of the opening block")

    def close(self) -> None:
        self.resp.close()
        self.conn.close()


@asynccontextmanager
async def stream(port: int, path: str, last_event_id: str | None = None) -> AsyncIterator[EventSourceReader]:
    reader = await in_thread(lambda: EventSourceReader(port, path, last_event_id))
    try:
        assert reader.status == 200, reader.resp.read()
        # Sent once the subscription is registered: publishing is safe now.
        await in_thread(reader.opening)
        yield reader
    finally:
        await in_thread(reader.close)


async def events(reader: EventSourceReader, n: int) -> list[dict[str, Any]]:
    out = []
    for _ in range(n):
        event = await in_thread(reader.event)
        assert event is not None, f"stream ended after {out}"
        out.append(event)
    return out
