"""etcd v3 through its JSON gateway (grpc-gateway, ``/v3/...``).

etcd 3.4 serves every KV, lease and watch call as JSON over HTTP on its
client port: keys and values are base64, 64-bit integers are strings, and
fields at their default value (0, false, empty) are left out. That lets the
broker reach etcd from Trio with httpx; etcd's own gRPC clients are
asyncio- or thread-based.

What it offers is what docs/cluster.md needs and no more: ``get`` /
``get_prefix``, ``put``, ``delete``, ``txn`` with compares on create
revision, mod revision, version and value, leases (grant, one keepalive,
revoke, time to live) and ``watch``, the gateway's streaming
``/v3/watch``. Every failure is an ``EtcdError``: ``EtcdUnavailable`` when
etcd could not be reached or did not answer in time (the call may or may
not have taken effect), otherwise etcd's own gRPC code and message.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import Any, ClassVar, Literal

import attrs
import httpx

from .httpio import TooLarge, finish, open_stream, read_bounded

#: Bound on one unary call (connect, send, answer).
DEFAULT_TIMEOUT = 5.0
#: A JSON answer larger than this is refused rather than parsed (a range
#: over a huge prefix should be paged with ``limit``).
MAX_ANSWER_BYTES = 64 * 1024 * 1024

# gRPC status codes etcd answers with (google.golang.org/grpc/codes).
NOT_FOUND = 5
FAILED_PRECONDITION = 9
OUT_OF_RANGE = 11
UNAVAILABLE = 14


class EtcdError(Exception):
    """etcd refused a call; ``code`` is its gRPC status code (0 if none)."""

    def __init__(self, message: str, code: int = 0) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class EtcdUnavailable(EtcdError):
    """etcd could not be reached or did not answer in time. For a write the
    outcome is unknown: it may have been applied."""

    def __init__(self, message: str) -> None:
        super().__init__(message, UNAVAILABLE)


class LeaseNotFound(EtcdError):
    """The lease expired or was revoked (or never existed)."""

    def __init__(self, lease: int) -> None:
        super().__init__(f"etcd lease {lease:x} not found (expired or revoked)", NOT_FOUND)
        self.lease = lease


class WatchCanceled(EtcdError):
    """etcd ended a watch; ``compact_revision`` is set when the revision it
    was to start from has been compacted away (start again from a fresh read)."""

    def __init__(self, reason: str, compact_revision: int = 0) -> None:
        super().__init__(f"etcd watch canceled: {reason}")
        self.compact_revision = compact_revision


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


def prefix_end(prefix: bytes) -> bytes:
    """The ``range_end`` that makes a range cover every key starting with
    ``prefix`` (etcd's rule: the prefix with its last byte below 0xff
    incremented; a prefix of only 0xff bytes, or empty, means "to the end")."""
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return b"\x00"
    return stripped[:-1] + bytes([stripped[-1] + 1])


@attrs.frozen
class KeyValue:
    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int = 0

    @classmethod
    def from_json(cls, kv: dict[str, Any]) -> KeyValue:
        return cls(
            key=_unb64(kv.get("key", "")),
            value=_unb64(kv.get("value", "")),
            create_revision=int(kv.get("create_revision", 0)),
            mod_revision=int(kv.get("mod_revision", 0)),
            version=int(kv.get("version", 0)),
            lease=int(kv.get("lease", 0)),
        )


@attrs.frozen
class RangeResult:
    kvs: list[KeyValue]
    #: The store's revision when the range was read.
    revision: int
    #: More keys matched than ``limit`` let through.
    more: bool
    count: int


Operator = Literal["==", "!=", "<", ">"]
_RESULTS = {"==": "EQUAL", "!=": "NOT_EQUAL", "<": "LESS", ">": "GREATER"}
_TARGETS = {"create_revision": "CREATE", "mod_revision": "MOD", "version": "VERSION", "value": "VALUE"}


@attrs.frozen
class Compare:
    """One condition of a transaction: ``key``'s ``target`` ``op`` ``operand``.
    A key that does not exist has create revision, mod revision and version 0."""

    key: bytes
    target: Literal["create_revision", "mod_revision", "version", "value"]
    op: Operator
    operand: int | bytes

    @classmethod
    def create_revision(cls, key: bytes, op: Operator, revision: int) -> Compare:
        return cls(key, "create_revision", op, revision)

    @classmethod
    def mod_revision(cls, key: bytes, op: Operator, revision: int) -> Compare:
        return cls(key, "mod_revision", op, revision)

    @classmethod
    def version(cls, key: bytes, op: Operator, version: int) -> Compare:
        return cls(key, "version", op, version)

    @classmethod
    def value(cls, key: bytes, op: Operator, value: bytes) -> Compare:
        return cls(key, "value", op, value)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"key": _b64(self.key), "target": _TARGETS[self.target], "result": _RESULTS[self.op]}
        if self.target == "value":
            assert isinstance(self.operand, bytes)
            out["value"] = _b64(self.operand)
        else:
            assert isinstance(self.operand, int)
            out[self.target] = str(self.operand)
        return out


@attrs.frozen
class Put:
    key: bytes
    value: bytes
    lease: int = 0

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"key": _b64(self.key), "value": _b64(self.value)}
        if self.lease:
            body["lease"] = str(self.lease)
        return {"request_put": body}


@attrs.frozen
class _KeyRange:
    """A key, or every key under it (``prefix``), as a transaction request."""

    key: bytes
    prefix: bool = False
    #: Every key in ``[key, range_end)`` (instead of ``prefix``).
    range_end: bytes | None = None
    #: The request's name in a transaction.
    request: ClassVar[str] = ""

    def to_json(self) -> dict[str, Any]:
        body = {"key": _b64(self.key)}
        if self.range_end is not None:
            body["range_end"] = _b64(self.range_end)
        elif self.prefix:
            body["range_end"] = _b64(prefix_end(self.key))
        return {self.request: body}


@attrs.frozen
class Delete(_KeyRange):
    request: ClassVar[str] = "request_delete_range"


@attrs.frozen
class Get(_KeyRange):
    request: ClassVar[str] = "request_range"


Op = Put | Delete | Get


@attrs.frozen
class TxnResult:
    succeeded: bool
    #: The store's revision after the transaction (the revision of its
    #: writes if it wrote anything).
    revision: int
    #: One entry per operation of the branch that ran: a Get's key-values,
    #: a Delete's count of deleted keys, None for a Put.
    responses: list[list[KeyValue] | int | None]


@attrs.frozen
class WatchEvent:
    type: Literal["PUT", "DELETE"]
    kv: KeyValue
    #: The key-value before the event, when the watch asked for it.
    prev_kv: KeyValue | None = None


@attrs.frozen
class WatchBatch:
    """Events etcd sent together (those of one revision, or several)."""

    revision: int
    events: list[WatchEvent]


def _header_revision(answer: dict[str, Any]) -> int:
    return int(answer.get("header", {}).get("revision", 0))


def _error_of(answer: Any, status: int) -> EtcdError:
    if isinstance(answer, dict):
        # Unary errors: {"error", "code", "message"}; a stream's: {"grpc_code", "message", ...}.
        message = answer.get("message") or answer.get("error") or f"HTTP {status}"
        code = answer.get("code", answer.get("grpc_code", 0))
        return EtcdError(str(message), code if isinstance(code, int) else 0)
    return EtcdError(f"etcd answered HTTP {status} with {answer!r:.200}")


class Etcd:
    """A connection pool to an etcd cluster: one or more client URLs
    (``http://host:port``) of its members.

    Calls go to the current endpoint. One that cannot be connected to (the
    request was not sent) is left for the next, and the call is tried
    there, once around the list; any other failure (a timeout or a broken
    connection after sending, etcd answering "unavailable") is raised as
    ``EtcdUnavailable`` (for a write, outcome unknown) and the next call
    goes to the next endpoint. Use it as an async context manager, or call
    ``aclose``. Calls may run concurrently from several tasks.
    """

    def __init__(self, urls: str | Sequence[str], *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.urls = [u.rstrip("/") for u in ([urls] if isinstance(urls, str) else urls)]
        if not self.urls:
            raise ValueError("no etcd endpoint given")
        self.timeout = timeout
        self._current = 0
        self._http = httpx.AsyncClient(timeout=timeout)

    @property
    def url(self) -> str:
        """The endpoint calls go to now."""
        return self.urls[self._current]

    def _next_endpoint(self, failed: str) -> None:
        if self.url == failed:  # another task may have moved on already
            self._current = (self._current + 1) % len(self.urls)

    async def __aenter__(self) -> Etcd:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        last = EtcdUnavailable("no etcd endpoint tried")
        for _ in range(len(self.urls)):
            url = self.url
            try:
                status, content = await self._post(url + path, body)
            except httpx.ConnectError as exc:
                self._next_endpoint(url)
                last = EtcdUnavailable(f"etcd at {url} unreachable for {path}: {exc!r}")
                continue
            except httpx.TimeoutException as exc:
                self._next_endpoint(url)
                raise EtcdUnavailable(f"etcd at {url} did not answer {path} within {self.timeout}s") from exc
            except httpx.TransportError as exc:
                self._next_endpoint(url)
                raise EtcdUnavailable(f"etcd at {url} broke off {path}: {exc!r}") from exc
            answer = _json_or_none(content)
            if status != 200 or not isinstance(answer, dict) or "error" in answer:
                if answer is None:
                    raise EtcdError(f"etcd at {url} answered {path} with HTTP {status} and no JSON")
                error = _error_of(answer, status)
                if error.code == UNAVAILABLE:  # e.g. "no leader" during an election
                    self._next_endpoint(url)
                    raise EtcdUnavailable(f"etcd at {url}: {error.message}") from None
                raise error
            return answer
        raise last

    async def _post(self, url: str, body: dict[str, Any]) -> tuple[int, bytes]:
        """POST ``body``; the status and the answer, read up to MAX_ANSWER_BYTES."""
        async with open_stream(self._http, "POST", url, content=_json_body(body), headers=_JSON) as response:
            try:
                return response.status_code, await read_bounded(response, MAX_ANSWER_BYTES)
            except TooLarge:
                raise EtcdError(f"etcd's answer from {url} is over {MAX_ANSWER_BYTES} bytes") from None

    async def status(self) -> tuple[int, int]:
        """(this endpoint's member id, the leader's member id) as the
        current endpoint sees them."""
        answer = await self._call("/v3/maintenance/status", {})
        return int(answer.get("header", {}).get("member_id", 0)), int(answer.get("leader", 0))

    # -- keys ---------------------------------------------------------------

    async def get(self, key: bytes) -> KeyValue | None:
        result = await self.range(key)
        return result.kvs[0] if result.kvs else None

    async def get_prefix(self, prefix: bytes, *, limit: int = 0) -> RangeResult:
        """Every key starting with ``prefix``, in key order (at most
        ``limit`` if it is not 0; ``more`` says whether there are more)."""
        return await self.range(prefix, prefix_end(prefix), limit=limit)

    async def range(
        self,
        key: bytes,
        range_end: bytes | None = None,
        *,
        limit: int = 0,
        revision: int = 0,
        descending: bool = False,
        keys_only: bool = False,
    ) -> RangeResult:
        """Keys in ``[key, range_end)`` (just ``key`` without ``range_end``),
        in key order, or in reverse key order when ``descending`` (with
        ``limit=1``: the greatest key below ``range_end``, in one read);
        ``keys_only``: without their values."""
        body: dict[str, Any] = {"key": _b64(key)}
        if keys_only:
            body["keys_only"] = True
        if descending:
            body["sort_order"] = "DESCEND"
            body["sort_target"] = "KEY"
        if range_end is not None:
            body["range_end"] = _b64(range_end)
        if limit:
            body["limit"] = str(limit)
        if revision:
            body["revision"] = str(revision)
        answer = await self._call("/v3/kv/range", body)
        kvs = [KeyValue.from_json(kv) for kv in answer.get("kvs", [])]
        return RangeResult(kvs, _header_revision(answer), bool(answer.get("more", False)), int(answer.get("count", 0)))

    async def put(self, key: bytes, value: bytes, *, lease: int = 0) -> int:
        """Write ``key``; returns the store's revision of the write."""
        return _header_revision(await self._call("/v3/kv/put", Put(key, value, lease).to_json()["request_put"]))

    async def delete(self, key: bytes, *, prefix: bool = False) -> int:
        """Delete ``key`` (or every key under it); returns how many went."""
        answer = await self._call("/v3/kv/deleterange", Delete(key, prefix).to_json()["request_delete_range"])
        return int(answer.get("deleted", 0))

    async def txn(self, compare: Iterable[Compare], success: Sequence[Op], failure: Sequence[Op] = ()) -> TxnResult:
        """One atomic transaction: if every comparison holds, ``success``
        runs, else ``failure``. Either branch's writes all happen or none."""
        body = {
            "compare": [c.to_json() for c in compare],
            "success": [op.to_json() for op in success],
            "failure": [op.to_json() for op in failure],
        }
        answer = await self._call("/v3/kv/txn", body)
        responses: list[list[KeyValue] | int | None] = []
        for response in answer.get("responses", []):
            if "response_range" in response:
                responses.append([KeyValue.from_json(kv) for kv in response["response_range"].get("kvs", [])])
            elif "response_delete_range" in response:
                responses.append(int(response["response_delete_range"].get("deleted", 0)))
            else:
                responses.append(None)
        return TxnResult(bool(answer.get("succeeded", False)), _header_revision(answer), responses)

    async def compact(self, revision: int) -> None:
        """Forget history before ``revision`` (watches from older revisions
        are then canceled with the compact revision)."""
        await self._call("/v3/kv/compaction", {"revision": str(revision)})

    # -- leases ---------------------------------------------------------------

    async def grant(self, ttl: int) -> tuple[int, int]:
        """A new lease of ``ttl`` seconds: (lease id, the TTL etcd granted,
        which it may raise to its minimum)."""
        answer = await self._call("/v3/lease/grant", {"TTL": str(ttl)})
        if "error" in answer or not answer.get("ID"):
            raise EtcdError(f"etcd granted no lease: {answer.get('error', answer)!r:.200}")
        return int(answer["ID"]), int(answer.get("TTL", 0))

    async def keepalive(self, lease: int) -> int:
        """Renew ``lease`` once; returns its TTL in seconds, counted from
        when etcd's leader renewed it. Raises LeaseNotFound if it is gone.

        The gateway's keepalive is a stream; one request with one message
        gets one answer and ends, which is all a renewal needs."""
        answer = await self._call("/v3/lease/keepalive", {"ID": str(lease)})
        result = answer.get("result", answer)
        ttl = int(result.get("TTL", 0))
        if ttl <= 0:
            raise LeaseNotFound(lease)
        return ttl

    async def time_to_live(self, lease: int) -> int:
        """Seconds ``lease`` has left (-1 if it is gone)."""
        answer = await self._call("/v3/lease/timetolive", {"ID": str(lease)})
        return int(answer.get("TTL", -1))

    async def revoke(self, lease: int) -> None:
        """End ``lease`` now: every key attached to it is deleted."""
        try:
            await self._call("/v3/kv/lease/revoke", {"ID": str(lease)})
        except EtcdError as exc:
            if exc.code == NOT_FOUND:
                raise LeaseNotFound(lease) from None
            raise

    # -- watches --------------------------------------------------------------

    @asynccontextmanager
    async def watch(
        self, key: bytes, *, prefix: bool = False, start_revision: int = 0, prev_kv: bool = False
    ) -> AsyncIterator[Watch]:
        """Watch ``key`` (or every key under it) from ``start_revision`` (0:
        from now). Yields a ``Watch``, an async iterator of ``WatchBatch``;
        etcd has registered the watch before the block starts, so a write
        made inside the block is seen."""
        request: dict[str, Any] = {"key": _b64(key)}
        if prefix:
            request["range_end"] = _b64(prefix_end(key))
        if start_revision:
            request["start_revision"] = str(start_revision)
        if prev_kv:
            request["prev_kv"] = True
        # No read timeout: a quiet key sends nothing for as long as it stays quiet.
        timeout = httpx.Timeout(self.timeout, read=None)
        url = self.url
        stream = open_stream(
            self._http, "POST", url + "/v3/watch", content=_json_body({"create_request": request}), headers=_JSON, timeout=timeout
        )
        try:
            response = await stream.__aenter__()
        except httpx.TransportError as exc:
            self._next_endpoint(url)
            raise EtcdUnavailable(f"etcd at {url} unreachable for a watch: {exc!r}") from exc
        try:
            if response.status_code != 200:
                await response.aread()
                raise _error_of(_json_or_none(response.content), response.status_code)
            watch = Watch(response, url)
            try:
                created = await watch.next_result()
                if not created.get("created"):
                    raise EtcdError(f"etcd did not create the watch: {created!r:.200}")
                yield watch
            finally:
                await watch.aclose()
        finally:
            await stream.__aexit__(None, None, None)


_JSON = {"Content-Type": "application/json"}


def _json_body(body: dict[str, Any]) -> bytes:
    return json.dumps(body).encode()


def _json_or_none(data: bytes) -> Any:
    try:
        return json.loads(data)
    except ValueError:
        return None


class Watch:
    """The batches of one watch, in revision order. Iterating raises
    WatchCanceled if etcd ends the watch (its start revision was compacted),
    EtcdUnavailable if the stream breaks or ends."""

    def __init__(self, response: httpx.Response, url: str) -> None:
        self.url = url
        self._lines = response.aiter_lines()

    async def aclose(self) -> None:
        await finish(self._lines)

    def __aiter__(self) -> Watch:
        return self

    async def __anext__(self) -> WatchBatch:
        while True:
            result = await self.next_result()
            if result.get("canceled"):
                reason = result.get("cancel_reason") or "compacted"
                raise WatchCanceled(reason, int(result.get("compact_revision", 0)))
            events = [
                WatchEvent(
                    "DELETE" if event.get("type") == "DELETE" else "PUT",
                    KeyValue.from_json(event.get("kv", {})),
                    KeyValue.from_json(event["prev_kv"]) if "prev_kv" in event else None,
                )
                for event in result.get("events", [])
            ]
            if events:  # progress notifications carry none
                return WatchBatch(_header_revision(result), events)

    async def next_result(self) -> dict[str, Any]:
        """The next message's ``result`` object, whatever it holds."""
        while True:
            try:
                line = await self._lines.__anext__()
            except StopAsyncIteration:
                raise EtcdUnavailable(f"etcd at {self.url} ended the watch stream") from None
            except httpx.TransportError as exc:
                raise EtcdUnavailable(f"etcd watch at {self.url} broke: {exc!r}") from exc
            if line.strip():
                break
        message = _json_or_none(line.encode())
        if not isinstance(message, dict):
            raise EtcdError(f"etcd watch at {self.url} sent a line that is not a JSON object: {line!r:.200}")
        if "error" in message:
            raise _error_of(message["error"], 200)
        result = message.get("result")
        if not isinstance(result, dict):
            raise EtcdError(f"etcd watch at {self.url} sent no result: {line!r:.200}")
        return result
