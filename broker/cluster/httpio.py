"""Reading httpx streams with a bound, and ending them part-read, under Trio.

httpx streams a body through a chain of async generators. Closing the
outermost one leaves the inner ones suspended, and Trio warns as it
collects them; ``finish`` instead reads on under a cancelled scope, which
ends every generator of the chain with the cancellation raised at the
socket (or at once, if the stream already ended).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
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
