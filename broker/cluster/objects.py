"""The S3 calls cluster mode's data path needs, over httpx.

- ``put_if_absent``: PUT with ``If-None-Match: *``; True if this call
  created the object, False if one already had that key (HTTP 412). Data
  objects are immutable: a name is written once or not at all.
- ``get``: the object or a byte range of it (``Range: bytes=a-b``).
- ``delete``, ``list`` (ListObjectsV2, every page), ``create_bucket``.

Path-style addressing (``endpoint/bucket/key``), which S3-compatible
stores (SeaweedFS, MinIO) and AWS all accept. Requests are signed with
AWS Signature Version 4 when credentials are given; a store run without
authentication (SeaweedFS by default) takes them unsigned. Every failure is
an ``ObjectStoreError`` carrying the HTTP status and the S3 error code.
"""

from __future__ import annotations

import xml.etree.ElementTree as ElementTree
from collections.abc import Mapping
from datetime import datetime
from urllib.parse import urlsplit

import attrs
import httpx

from .httpio import TooLarge, open_stream, read_bounded
from .sigv4 import Credentials, canonical_query, sign, uri_encode

DEFAULT_TIMEOUT = 10.0
#: Bound on one answer (an object or a byte range of one, a LIST page):
#: data objects are at most a few hundred MiB (docs/cluster.md, §13).
DEFAULT_MAX_ANSWER_BYTES = 512 * 1024 * 1024
_NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"


class ObjectStoreError(Exception):
    """The store refused a call or could not be reached (``status`` 0)."""

    def __init__(self, message: str, status: int = 0, code: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class NoSuchKey(ObjectStoreError):
    pass


@attrs.frozen
class ObjectInfo:
    key: str
    size: int
    etag: str
    #: When the store says it was written, seconds since the epoch (0.0 if
    #: it did not say).
    last_modified: float = 0.0


def _timestamp(text: str) -> float:
    """S3's ``LastModified`` (ISO 8601, e.g. 2026-12-05T16:04:38.000Z)."""
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


@attrs.frozen
class _Answer:
    status_code: int
    content: bytes


def _child(element: ElementTree.Element, name: str) -> str:
    found = element.find(_NS + name)
    if found is None:
        found = element.find(name)  # some stores leave the namespace out
    return (found.text or "") if found is not None else ""


class ObjectStore:
    """One bucket of an S3-compatible store at ``endpoint`` (``http://host:port``),
    or the keys under ``prefix`` in it (keys given and listed are then
    relative to the prefix: one bucket can hold several clusters)."""

    def __init__(
        self,
        endpoint: str,
        bucket: str,
        *,
        prefix: str = "",
        credentials: Credentials | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        max_answer_bytes: int = DEFAULT_MAX_ANSWER_BYTES,
    ) -> None:
        self.max_answer_bytes = max_answer_bytes
        self.endpoint = endpoint.rstrip("/")
        self.bucket = bucket
        self.prefix = prefix
        self.credentials = credentials
        self._host = urlsplit(self.endpoint).netloc
        self._http = httpx.AsyncClient(base_url=self.endpoint, timeout=timeout)

    async def __aenter__(self) -> ObjectStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _request(
        self,
        method: str,
        key: str | None,
        *,
        body: bytes = b"",
        headers: Mapping[str, str] | None = None,
        query: Mapping[str, str] | None = None,
    ) -> _Answer:
        """One request's status and body, the body read up to ``max_answer_bytes``."""
        path = "/" + uri_encode(self.bucket, keep_slash=False)
        if key is not None:
            path += "/" + uri_encode(self.prefix + key, keep_slash=True)
        headers = dict(headers or {})
        query = dict(query or {})
        if self.credentials is not None:
            headers.update(sign(self.credentials, method, self._host, path, query, headers, body))
        # The query goes on the URL exactly as it was signed.
        url = path + ("?" + canonical_query(query) if query else "")
        try:
            async with open_stream(self._http, method, url, content=body, headers=headers) as response:
                return _Answer(response.status_code, await read_bounded(response, self.max_answer_bytes))
        except TooLarge:
            raise ObjectStoreError(f"{method} {path}: the answer is over {self.max_answer_bytes} bytes") from None
        except httpx.TransportError as exc:
            raise ObjectStoreError(f"object store {self.endpoint} unreachable for {method} {path}: {exc!r}") from exc

    def _refused(self, response: _Answer, what: str) -> ObjectStoreError:
        code = message = ""
        try:
            root = ElementTree.fromstring(response.content)
            code, message = _child(root, "Code"), _child(root, "Message")
        except ElementTree.ParseError:
            pass
        text = f"{what}: HTTP {response.status_code} {code} {message}".rstrip()
        if code == "NoSuchKey" or (response.status_code == 404 and code != "NoSuchBucket"):
            return NoSuchKey(text, response.status_code, code or "NoSuchKey")
        return ObjectStoreError(text, response.status_code, code)

    async def create_bucket(self) -> None:
        """Create the bucket; one that this account already owns is fine."""
        response = await self._request("PUT", None)
        if response.status_code != 200 and not (response.status_code == 409 and b"BucketAlreadyOwnedByYou" in response.content):
            raise self._refused(response, f"create bucket {self.bucket}")

    async def put_if_absent(self, key: str, data: bytes) -> bool:
        """Store ``data`` under ``key`` unless that key exists: True if this
        call created it, False if the store kept what was there (412). A
        409 (AWS answers it when a concurrent conditional write to the same
        key is in flight) is raised: the caller retries or gives the name up."""
        response = await self._request("PUT", key, body=data, headers={"if-none-match": "*"})
        if response.status_code == 200:
            return True
        if response.status_code == 412:
            return False
        raise self._refused(response, f"put {key}")

    async def get(self, key: str, start: int | None = None, end: int | None = None) -> bytes:
        """The object, or its bytes ``start`` to ``end`` inclusive (``end``
        None: to the end). Raises NoSuchKey if there is none."""
        headers = {}
        if start is not None:
            headers["range"] = f"bytes={start}-{'' if end is None else end}"
        response = await self._request("GET", key, headers=headers)
        if start is not None and response.status_code == 206:
            return response.content
        if response.status_code == 200:
            # A store may ignore Range and send the whole object: cut it here.
            return response.content if start is None else response.content[start : None if end is None else end + 1]
        raise self._refused(response, f"get {key}")

    async def delete(self, key: str) -> None:
        """Delete ``key`` (S3 answers 204 whether or not it existed)."""
        response = await self._request("DELETE", key)
        if response.status_code not in (200, 204):
            raise self._refused(response, f"delete {key}")

    async def list(self, prefix: str = "", *, page_size: int = 1000) -> list[ObjectInfo]:
        """Every object whose key starts with ``prefix``, in key order."""
        out: list[ObjectInfo] = []
        token = ""
        for _ in range(1_000_000):  # a bound: 10^9 keys at the default page size
            query = {"list-type": "2", "prefix": self.prefix + prefix, "max-keys": str(page_size)}
            if token:
                query["continuation-token"] = token
            response = await self._request("GET", None, query=query)
            if response.status_code != 200:
                raise self._refused(response, f"list {prefix!r}")
            try:
                root = ElementTree.fromstring(response.content)
            except ElementTree.ParseError as exc:
                raise ObjectStoreError(f"list {prefix!r}: the store's answer is not XML: {exc}") from exc
            for item in [*root.findall(_NS + "Contents"), *root.findall("Contents")]:
                key = _child(item, "Key")[len(self.prefix) :]
                out.append(
                    ObjectInfo(
                        key,
                        int(_child(item, "Size") or 0),
                        _child(item, "ETag").strip('"'),
                        _timestamp(_child(item, "LastModified")),
                    )
                )
            token = _child(root, "NextContinuationToken")
            if _child(root, "IsTruncated") != "true" or not token:
                return out
        raise ObjectStoreError(f"list {prefix!r}: more pages than the bound")
