"""AWS Signature Version 4 for S3 requests (header form), with hmac/hashlib.

The algorithm as AWS documents it ("Signature Version 4 signing process"):
a canonical request (method, URI-encoded path, sorted query, the signed
headers lower-cased and sorted, the payload's SHA-256), hashed into a
string to sign scoped to date/region/service, signed with a key derived by
HMAC chain from the secret. The payload hash is always sent as
``x-amz-content-sha256`` (S3 requires it), so the body is covered too.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from datetime import datetime, timezone
from urllib.parse import quote

import attrs

ALGORITHM = "AWS4-HMAC-SHA256"


@attrs.frozen(repr=False)
class Credentials:
    access_key: str
    secret_key: str
    region: str = "us-east-1"

    def __repr__(self) -> str:  # never print the secret
        return f"Credentials(access_key={self.access_key!r}, region={self.region!r})"


def _hmac(key: bytes, text: str) -> bytes:
    return hmac.new(key, text.encode("utf-8"), hashlib.sha256).digest()


def uri_encode(text: str, *, keep_slash: bool) -> str:
    """AWS's URI encoding: everything but unreserved characters (and ``/``
    in a path) percent-encoded, upper-case hex."""
    return quote(text, safe="-_.~/" if keep_slash else "-_.~")


def canonical_query(query: Mapping[str, str]) -> str:
    """The query string as signed (and so as it must be sent): sorted, encoded."""
    return "&".join(f"{uri_encode(k, keep_slash=False)}={uri_encode(v, keep_slash=False)}" for k, v in sorted(query.items()))


def sign(
    credentials: Credentials,
    method: str,
    host: str,
    path: str,
    query: Mapping[str, str],
    headers: Mapping[str, str],
    payload: bytes,
    *,
    now: datetime | None = None,
    service: str = "s3",
) -> dict[str, str]:
    """The headers to add to the request: x-amz-date, x-amz-content-sha256
    and Authorization. ``path`` is already URI-encoded as it will be sent;
    ``headers`` are the other headers to sign (e.g. Range, If-None-Match)."""
    now = now or datetime.now(timezone.utc)
    amz_date = now.strftime("%Y%m%dT%H%M%SZ")
    date = amz_date[:8]
    payload_hash = hashlib.sha256(payload).hexdigest()
    signed = {k.lower(): " ".join(v.strip().split()) for k, v in headers.items()}
    signed.update({"host": host, "x-amz-date": amz_date, "x-amz-content-sha256": payload_hash})
    names = sorted(signed)
    canonical = "\n".join(
        [
            method,
            path,
            canonical_query(query),
            "".join(f"{name}:{signed[name]}\n" for name in names),
            ";".join(names),
            payload_hash,
        ]
    )
    scope = f"{date}/{credentials.region}/{service}/aws4_request"
    to_sign = "\n".join([ALGORITHM, amz_date, scope, hashlib.sha256(canonical.encode("utf-8")).hexdigest()])
    key = _hmac(("AWS4" + credentials.secret_key).encode("utf-8"), date)
    for part in (credentials.region, service, "aws4_request"):
        key = _hmac(key, part)
    signature = hmac.new(key, to_sign.encode("utf-8"), hashlib.sha256).hexdigest()
    return {
        "x-amz-date": amz_date,
        "x-amz-content-sha256": payload_hash,
        "authorization": (
            f"{ALGORITHM} Credential={credentials.access_key}/{scope}, "
            f"SignedHeaders={';'.join(names)}, Signature={signature}"
        ),
    }
