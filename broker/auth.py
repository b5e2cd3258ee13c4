"""Authentication: the users file, secret hashing, checking credentials.

The users file (``pybroker serve --auth FILE``) is TOML::

    [users.alice]
    password = "scrypt$n=32768,r=8,p=1$<salt>$<hash>"   # pybroker auth hash-password
    subscribe = { allow = ["orders.>"], deny = ["orders.internal.>"] }
    publish = { allow = ["orders.*"] }

    [users.ingest]
    token = "sha256:<64 hex digits>"                      # pybroker auth hash-token
    publish = { allow = [">"] }
    admin = true

No secret is stored in clear: passwords as scrypt hashes that carry their
own parameters and salt (so tests can use cheap ones while the default is
strong), tokens as the SHA-256 of the token (tokens are random and long, so
a fast hash suffices and lookups stay O(1)). A file that breaks any of this
is refused as a whole with a message naming the user and field: the broker
does not start on a half-understood security configuration.

scrypt costs tens of milliseconds, so it never runs on the event loop:
:class:`Authenticator` hands it to worker threads bounded by a
``trio.CapacityLimiter``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import secrets
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import trio

from pybroker.protocol import pattern_error

from .permissions import Permissions

if TYPE_CHECKING:
    from .config import Config

#: scrypt parameters of new password hashes: 32 MiB and ~0.1 s per check.
DEFAULT_SCRYPT_N = 2**15
DEFAULT_SCRYPT_R = 8
DEFAULT_SCRYPT_P = 1
_SALT_BYTES = 16
_KEY_BYTES = 32
#: Bounds on parameters read from a users file (a typo must not make every
#: login take minutes or gigabytes).
_MAX_SCRYPT_MEMORY = 256 * 1024 * 1024
#: Worker threads that may run scrypt at once (each holds 128*n*r bytes).
KDF_THREADS = 2
#: HELLO option keys carrying credentials (protocol.md, "HELLO").
OPTION_USER = "user"
OPTION_PASSWORD = "password"
OPTION_TOKEN = "token"
_USER_KEYS = frozenset({"password", "token", "publish", "subscribe", "manage", "admin"})
_RULE_KEYS = frozenset({"allow", "deny"})


class UsersFileError(ValueError):
    """The users file cannot be used; the message says where and why."""


# -- hashing --------------------------------------------------------------


@attrs.frozen
class _Scrypt:
    n: int
    r: int
    p: int
    salt: bytes
    key: bytes

    def derive(self, password: str) -> bytes:
        return hashlib.scrypt(
            password.encode("utf-8"),
            salt=self.salt,
            n=self.n,
            r=self.r,
            p=self.p,
            dklen=len(self.key),
            maxmem=2 * 128 * self.n * self.r * self.p + 1024 * 1024,
        )


def hash_password(
    password: str,
    *,
    n: int = DEFAULT_SCRYPT_N,
    r: int = DEFAULT_SCRYPT_R,
    p: int = DEFAULT_SCRYPT_P,
) -> str:
    """``scrypt$n=N,r=R,p=P$<salt b64>$<key b64>`` for the users file."""
    if not password:
        raise ValueError("the password is empty")
    if "\0" in password:
        raise ValueError("a password cannot contain a NUL character")
    params = _Scrypt(n, r, p, secrets.token_bytes(_SALT_BYTES), b"\0" * _KEY_BYTES)
    _check_params(params)
    key = params.derive(password)
    return f"scrypt$n={n},r={r},p={p}${_b64(params.salt)}${_b64(key)}"


def hash_token(token: str) -> str:
    """``sha256:<hex>`` for the users file."""
    if len(token) < 16:
        raise ValueError("a token needs at least 16 characters (pybroker auth new-token makes one)")
    return "sha256:" + hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_token() -> str:
    """A random token: 32 bytes, URL-safe text."""
    return secrets.token_urlsafe(32)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def _check_params(s: _Scrypt) -> None:
    if s.n < 2 or s.n & (s.n - 1):
        raise ValueError(f"scrypt n must be a power of two >= 2, got {s.n}")
    if not 1 <= s.r <= 64 or not 1 <= s.p <= 16:
        raise ValueError(f"scrypt r must be 1..64 and p 1..16, got r={s.r} p={s.p}")
    if 128 * s.n * s.r * s.p > _MAX_SCRYPT_MEMORY:
        raise ValueError("scrypt parameters need more than 256 MiB per check")


def parse_password_hash(encoded: str) -> _Scrypt:
    """Check and decode a stored password hash; ValueError says what is wrong."""
    parts = encoded.split("$")
    if len(parts) != 4 or parts[0] != "scrypt":
        raise ValueError(
            "expected 'scrypt$n=N,r=R,p=P$SALT$HASH' (make one with `pybroker auth hash-password`);"
            " passwords are never stored in clear"
        )
    try:
        fields = dict(item.split("=", 1) for item in parts[1].split(","))
        if set(fields) != {"n", "r", "p"}:
            raise ValueError
        n, r, p = (int(fields[k]) for k in ("n", "r", "p"))
        salt, key = _unb64(parts[2]), _unb64(parts[3])
    except (ValueError, binascii.Error):
        raise ValueError("malformed scrypt hash: parameters n, r, p and base64 salt and hash expected") from None
    if len(salt) < 8 or not 16 <= len(key) <= 64:
        raise ValueError("scrypt salt must be at least 8 bytes and the hash 16..64 bytes")
    params = _Scrypt(n, r, p, salt, key)
    _check_params(params)
    return params


def verify_password(password: str, encoded: str | _Scrypt) -> bool:
    """Blocking (runs scrypt): call it in a worker thread."""
    params = parse_password_hash(encoded) if isinstance(encoded, str) else encoded
    if "\0" in password:
        # scrypt's PBKDF2 pads an HMAC key shorter than 64 bytes with zero
        # bytes, so "pw" and "pw\0" derive the same key. No stored password
        # has a NUL (hash_password refuses it): one that does is wrong.
        return False
    return hmac.compare_digest(params.derive(password), params.key)


def _token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


# -- the users file -------------------------------------------------------


@attrs.frozen
class User:
    name: str
    permissions: Permissions
    password: _Scrypt | None = attrs.field(default=None, repr=False)
    token_digest: bytes | None = attrs.field(default=None, repr=False)


@attrs.frozen
class Users:
    by_name: Mapping[str, User]
    by_token: Mapping[bytes, User]
    source: str = ""

    @classmethod
    def load(cls, path: Path) -> Users:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise UsersFileError(f"users file {path}: cannot read it: {exc}") from None
        return cls.parse(text, str(path))

    @classmethod
    def parse(cls, text: str, source: str = "users file") -> Users:
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise UsersFileError(f"{source}: not valid TOML: {exc}") from None
        unknown = sorted(set(doc) - {"users"})
        if unknown:
            raise UsersFileError(f"{source}: unknown top-level key {unknown[0]!r} (expected [users.NAME] tables)")
        table = doc.get("users")
        if not isinstance(table, dict) or not table:
            raise UsersFileError(f"{source}: no users (expected at least one [users.NAME] table)")
        by_name: dict[str, User] = {}
        by_token: dict[bytes, User] = {}
        for name, entry in table.items():
            where = f"{source}: user {name!r}"
            user = _parse_user(name, entry, where)
            if user.token_digest is not None:
                other = by_token.get(user.token_digest)
                if other is not None:
                    raise UsersFileError(f"{where}: same token as user {other.name!r}")
                by_token[user.token_digest] = user
            by_name[name] = user
        return cls(by_name, by_token, source)


def _parse_user(name: str, entry: Any, where: str) -> User:
    if not name or ":" in name or not name.isprintable() or len(name) > 255:
        raise UsersFileError(f"{where}: a user name is 1..255 printable characters without ':'")
    if not isinstance(entry, dict):
        raise UsersFileError(f"{where}: expected a table")
    unknown = sorted(set(entry) - _USER_KEYS)
    if unknown:
        raise UsersFileError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(_USER_KEYS))})")
    password = token = None
    if "password" in entry:
        if not isinstance(entry["password"], str):
            raise UsersFileError(f"{where}: password must be a string")
        try:
            password = parse_password_hash(entry["password"])
        except ValueError as exc:
            raise UsersFileError(f"{where}: password: {exc}") from None
    if "token" in entry:
        value = entry["token"]
        hexpart = value[7:] if isinstance(value, str) and value.startswith("sha256:") else ""
        if len(hexpart) != 64 or any(c not in "0123456789abcdef" for c in hexpart.lower()):
            raise UsersFileError(
                f"{where}: token must be 'sha256:' and 64 hex digits (make it with "
                "`pybroker auth hash-token`); tokens are never stored in clear"
            )
        token = bytes.fromhex(hexpart)
    if password is None and token is None:
        raise UsersFileError(f"{where}: needs a password hash, a token hash, or both")
    admin = entry.get("admin", False)
    if not isinstance(admin, bool):
        raise UsersFileError(f"{where}: admin must be true or false")
    pub_allow, pub_deny = _rules(entry.get("publish", {}), f"{where}: publish")
    sub_allow, sub_deny = _rules(entry.get("subscribe", {}), f"{where}: subscribe")
    manage_allow, manage_deny = _rules(entry.get("manage", {}), f"{where}: manage")
    permissions = Permissions(pub_allow, pub_deny, sub_allow, sub_deny, admin, manage_allow, manage_deny)
    return User(name, permissions, password, token)


def _rules(value: Any, where: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    if not isinstance(value, dict):
        raise UsersFileError(f"{where}: expected a table with 'allow' and/or 'deny' lists")
    unknown = sorted(set(value) - _RULE_KEYS)
    if unknown:
        raise UsersFileError(f"{where}: unknown key {unknown[0]!r} (known: allow, deny)")
    out: list[tuple[str, ...]] = []
    for key in ("allow", "deny"):
        patterns = value.get(key, [])
        if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
            raise UsersFileError(f"{where}.{key}: expected a list of topic patterns")
        for pattern in patterns:
            problem = pattern_error(pattern)
            if problem is not None:
                raise UsersFileError(f"{where}.{key}: {problem}")
        out.append(tuple(patterns))
    return out[0], out[1]


# -- checking credentials -------------------------------------------------


class Authenticator:
    """Checks HELLO options and HTTP credentials against the users file."""

    def __init__(self, users: Users, threads: int = KDF_THREADS) -> None:
        self.users = users
        self.limiter = trio.CapacityLimiter(threads)
        # Checked against when the user is unknown, so an unknown name costs
        # the same scrypt as a wrong password (no user enumeration). Random
        # salt and key: nothing derives to it, and nothing is hashed here.
        model = next((u.password for u in users.by_name.values() if u.password), None)
        n, r, p = (model.n, model.r, model.p) if model else (DEFAULT_SCRYPT_N, DEFAULT_SCRYPT_R, DEFAULT_SCRYPT_P)
        self._decoy = _Scrypt(n, r, p, secrets.token_bytes(_SALT_BYTES), secrets.token_bytes(_KEY_BYTES))

    def by_token(self, token: str) -> User | None:
        """Cheap (one SHA-256): no thread needed."""
        digest = _token_digest(token)
        user = self.users.by_token.get(digest)
        if user is None or user.token_digest is None:
            return None
        return user if hmac.compare_digest(user.token_digest, digest) else None

    async def by_password(self, name: str, password: str) -> User | None:
        user = self.users.by_name.get(name)
        params = user.password if user is not None and user.password is not None else self._decoy
        ok = await trio.to_thread.run_sync(verify_password, password, params, limiter=self.limiter)
        if not ok or user is None or user.password is None:
            return None
        return user

    async def hello(self, options: Mapping[str, str]) -> User | None:
        """The user HELLO's options authenticate, or None. Unknown keys are
        ignored (protocol.md); a token together with a user name is refused
        rather than guessed at."""
        token = options.get(OPTION_TOKEN)
        name = options.get(OPTION_USER)
        if token is not None:
            return self.by_token(token) if name is None else None
        if name is not None:
            return await self.by_password(name, options.get(OPTION_PASSWORD, ""))
        return None


# -- where the broker may listen without authentication ------------------


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name other than localhost, or "" (every address)


def unprotected_hosts(hosts: list[str]) -> list[str]:
    """The hosts among ``hosts`` that would expose an unauthenticated broker."""
    return [h for h in hosts if not is_loopback(h)]


def authenticator_for(config: Config) -> Authenticator | None:
    """Load the users file, or check that running without one is safe.

    Raises ValueError (UsersFileError) with a message for the operator, so
    a broker never starts on a security setting it did not understand."""
    if config.auth_file is not None:
        return Authenticator(Users.load(config.auth_file))
    hosts = [config.host]
    if config.http_port is not None and config.http_port >= 0 and config.http_host is not None:
        hosts.append(config.http_host)
    exposed = unprotected_hosts(hosts)
    if exposed and not config.allow_anonymous_remote:
        raise ValueError(
            f"refusing to listen on {', '.join(repr(h) for h in exposed)} without authentication: "
            "give a users file (--auth FILE), bind to loopback, or accept the risk with "
            "--allow-anonymous-remote"
        )
    return None
