"""Reading httpx streams with a bound, and ending them part-read, under Trio.

httpx streams a body through a chain of async generators. Closing the
outermost one leaves the inner ones suspended, and Trio warns as it
collects them; ``finish`` instead reads on under a cancelled scope, which
ends every generator of the chain with the cancellation raised at the
socket (or at once, if the stream already ended).

Request bodies likewise: httpx sends ``content=`` bytes through an async
generator, which a cancellation during the send (a node stopping, a
timeout) leaves suspended for Trio to warn about when it is collected;
``open_stream`` sends them through a plain iterator instead.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx

#: Bound on what a part-read stream may still hold in httpx's buffers.
_MAX_BUFFERED = 1_000_000


class TooLarge(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"the answer is over {limit} bytes")
        self.limit = limit


async def finish(iterator: AsyncIterator[Any]) -> None:
    """End an httpx stream iterator left part-read; drop what it still holds."""
    with anyio.CancelScope() as scope:
        scope.cancel()
        for _ in range(_MAX_BUFFERED):
            try:
                await iterator.__anext__()
            except (StopAsyncIteration, httpx.HTTPError):
                return


async def read_bounded(response: httpx.Response, limit: int) -> bytes:
    """The (decoded) body of a streamed response; TooLarge past ``limit``
    bytes, declared or received."""
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise TooLarge(limit)
    content = bytearray()
    chunks = response.aiter_bytes()
    async for chunk in chunks:
        content += chunk
        if len(content) > limit:
            await finish(chunks)
            raise TooLarge(limit)
    return bytes(content)


class _Once:
    """An async iterator of one chunk: no generator to leave suspended."""

    def __init__(self, data: bytes) -> None:
        self._data: bytes | None = data

    def __aiter__(self) -> _Once:
        return self

    async def __anext__(self) -> bytes:
        if self._data is None:
            raise StopAsyncIteration
        data, self._data = self._data, None
        return data


class RequestBody(httpx.AsyncByteStream):
    """A request body of bytes that httpx sends without an async generator."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __aiter__(self) -> AsyncIterator[bytes]:
        return _Once(self.data)


@asynccontextmanager
async def open_stream(
    client: httpx.AsyncClient,
    method: str,
    url: str,
    *,
    content: bytes,
    headers: dict[str, str] | None = None,
    timeout: Any = httpx.USE_CLIENT_DEFAULT,
) -> AsyncIterator[httpx.Response]:
    """``client.stream(method, url, content=...)``, its body sent as a ``RequestBody``."""
    request = client.build_request(method, url, content=content, headers=headers, timeout=timeout)
    request.stream = RequestBody(content)
    response = await client.send(request, stream=True)
    try:
        yield response
    finally:
        await response.aclose()
