"""Authentication: the users file, secret hashing, HELLO credentials, HTTP.

Real brokers on 127.0.0.1 (``running_broker(auth_file=...)``) with real
users files in tmp_path; passwords hashed with cheap scrypt parameters
(tests/helpers/auth.py). Every wait is bounded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TypeVar

import pytest
import structlog
import anyio
import trio

import pybroker
from pybroker.server.auth import (
    DEFAULT_SCRYPT_N,
    Authenticator,
    Users,
    UsersFileError,
    hash_password,
    hash_token,
    is_loopback,
    parse_password_hash,
    verify_password,
)
from pybroker.server.config import Config
from pybroker.server.server import Server
from pybroker.server.testing import running_broker
from pybroker.protocol import ErrorCode, Hello, Welcome

from helpers.auth import CHEAP, user_entry, users_toml, write_users
from helpers.anybroker import serving
from helpers.http import basic, http_request
from helpers.raw import expect_fatal, raw_client

TIMEOUT = 10.0
TOKEN = "t0ken-for-the-ingest-service"
ADMIN_TOKEN = "t0ken-for-the-operators-dashboard"
PASSWORD = "correct horse battery staple"

T = TypeVar("T")

#: The tests of what the client does with credentials run under Trio and
#: asyncio; the broker's side (hashing, the users file, HTTP, the wire) under
#: pytest-trio.
both = pytest.mark.anyio


def users_file(tmp_path: Path) -> Path:
    return write_users(
        tmp_path,
        {
            "alice": user_entry(password=PASSWORD, publish=["orders.>"], subscribe=["orders.>"]),
            "ingest": user_entry(token=TOKEN, publish=[">"], subscribe=["public.>"]),
            "ops": user_entry(token=ADMIN_TOKEN, admin=True),
        },
    )


# -- hashing and the users file ---------------------------------------------


def test_password_hash_is_self_describing_and_salted() -> None:
    encoded = hash_password("s3cret", **CHEAP)
    assert encoded.startswith("scrypt$n=16,r=1,p=1$")
    assert "s3cret" not in encoded
    assert hash_password("s3cret", **CHEAP) != encoded  # a fresh salt each time
    assert verify_password("s3cret", encoded)
    assert not verify_password("s3cret ", encoded)
    assert not verify_password("", encoded)
    params = parse_password_hash(hash_password("x"))
    assert (params.n, params.r, params.p) == (DEFAULT_SCRYPT_N, 8, 1)  # strong by default


@pytest.mark.parametrize(
    "bad",
    [
        "plain text password",
        "scrypt$n=16,r=1$AAAAAAAAAAA$AAAAAAAAAAAAAAAAAAAAAA",
        "scrypt$n=15,r=1,p=1$AAAAAAAAAAA$AAAAAAAAAAAAAAAAAAAAAA",  # not a power of two
        "scrypt$n=16,r=1,p=1$!!$AAAAAAAAAAAAAAAAAAAAAA",
        "scrypt$n=16,r=1,p=1$AAAA$AAAAAAAAAAAAAAAAAAAAAA",  # salt too short
        "scrypt$n=1048576,r=8,p=1$AAAAAAAAAAA$AAAAAAAAAAAAAAAAAAAAAA",  # 1 GiB per check
    ],
)
def test_malformed_password_hashes_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_password_hash(bad)


def test_the_users_file_holds_no_secret_in_clear(tmp_path: Path) -> None:
    text = users_file(tmp_path).read_text()
    assert PASSWORD not in text and TOKEN not in text and ADMIN_TOKEN not in text
    users = Users.load(tmp_path / "users.toml")
    assert set(users.by_name) == {"alice", "ingest", "ops"}
    assert users.by_name["ops"].permissions.admin
    assert TOKEN not in repr(users) and "scrypt" not in repr(users)


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("not = [valid", "not valid TOML"),
        ("", "no users"),
        ("[groups.x]\n", "unknown top-level key"),
        ('[users.a]\npassword = "hunter2hunter2"\n', "never stored in clear"),
        ('[users.a]\ntoken = "my-plain-token-1234567"\n', "never stored in clear"),
        ("[users.a]\nadmin = true\n", "needs a password hash, a token hash, or both"),
        (f'[users.a]\ntoken = "{hash_token(TOKEN)}"\nrole = "x"\n', "unknown key 'role'"),
        (f'[users.a]\ntoken = "{hash_token(TOKEN)}"\npublish = {{ allow = ["a..b"] }}\n', "publish.allow"),
        (f'[users.a]\ntoken = "{hash_token(TOKEN)}"\nsubscribe = {{ deny = ["a.>.b"] }}\n', "subscribe.deny"),
        (f'[users.a]\ntoken = "{hash_token(TOKEN)}"\nsubscribe = {{ allow = "a.>" }}\n', "list of topic patterns"),
        (f'[users.a]\ntoken = "{hash_token(TOKEN)}"\npublish = {{ permit = [] }}\n', "unknown key 'permit'"),
        (f'[users.a]\ntoken = "{hash_token(TOKEN)}"\nadmin = "yes"\n', "admin must be true or false"),
        (f'[users."a:b"]\ntoken = "{hash_token(TOKEN)}"\n', "without ':'"),
        (
            f'[users.a]\ntoken = "{hash_token(TOKEN)}"\n[users.b]\ntoken = "{hash_token(TOKEN)}"\n',
            "same token as user 'a'",
        ),
    ],
)
def test_a_malformed_users_file_is_refused_with_a_clear_message(text: str, complaint: str) -> None:
    with pytest.raises(UsersFileError) as refused:
        Users.parse(text, "users.toml")
    assert complaint in str(refused.value)
    assert str(refused.value).startswith("users.toml")


def test_a_broker_does_not_start_on_a_bad_users_file(tmp_path: Path) -> None:
    bad = tmp_path / "users.toml"
    bad.write_text('[users.a]\npassword = "plain"\n')
    with pytest.raises(UsersFileError, match="user 'a'"):
        Server(Config(auth_file=bad, storage="memory", port=0, http_port=0))
    with pytest.raises(UsersFileError, match="cannot read"):
        Server(Config(auth_file=tmp_path / "missing.toml", storage="memory"))


def test_without_auth_only_loopback_unless_told_otherwise() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("") and not is_loopback("example.com")
    for config in (
        Config(host="0.0.0.0", storage="memory"),
        Config(host="::", storage="memory"),
        Config(host="127.0.0.1", http_host="0.0.0.0", storage="memory"),
    ):
        with pytest.raises(ValueError, match="without authentication"):
            Server(config)
    assert Server(Config(host="0.0.0.0", allow_anonymous_remote=True, storage="memory")).broker.auth is None
    # HTTP disabled: its host does not matter.
    Server(Config(http_host="0.0.0.0", http_port=None, storage="memory"))


# -- HELLO credentials ----------------------------------------------------------


@both
async def test_token_password_and_url_credentials_are_accepted(tmp_path: Path) -> None:
    async with serving(auth_file=users_file(tmp_path)) as server:
        host_port = server.url.removeprefix("pybroker://")
        with anyio.fail_after(TIMEOUT):
            async with pybroker.connect(server.url, token=TOKEN) as c:
                assert (await c.publish("anything.at.all", b"x")).offset == 0
            async with pybroker.connect(server.url, user="alice", password=PASSWORD) as c:
                assert (await c.publish("orders.eu", b"x")).offset == 0
            async with pybroker.connect(f"pybroker://alice:{PASSWORD.replace(' ', '%20')}@{host_port}") as c:
                await c.ping()
            async with pybroker.connect(f"pybroker://{TOKEN}@{host_port}") as c:
                await c.ping()
        sessions_users = {s.principal.name for s in server.sessions if s.principal.user is not None}
        assert sessions_users <= {"alice", "ingest"}


@both
@pytest.mark.parametrize(
    "credentials",
    [
        {},
        {"token": "not-the-right-token-at-all"},
        {"token": ""},
        {"user": "alice", "password": "wrong"},
        {"user": "alice", "password": ""},
        {"user": "alice"},
        {"user": "mallory", "password": PASSWORD},
        {"user": "ingest", "password": TOKEN},  # a token user has no password
    ],
)
async def test_bad_or_missing_credentials_fail_without_saying_which(
    tmp_path: Path, credentials: dict[str, str]
) -> None:
    async with serving(auth_file=users_file(tmp_path)) as server:
        with anyio.fail_after(TIMEOUT), structlog.testing.capture_logs() as logs:
            with pytest.raises(pybroker.AuthenticationError) as refused:
                async with pybroker.connect(server.url, **credentials):  # type: ignore[arg-type]
                    pass
        assert refused.value.code == ErrorCode.AUTH_FAILED
        assert refused.value.message == "authentication failed"
        failures = [e for e in logs if e["event"] == "authentication failed"]
        assert len(failures) == 1, logs
        logged = json.dumps(logs, default=str)
        for secret in (PASSWORD, TOKEN, "not-the-right-token-at-all", "wrong"):
            if secret in credentials.values():
                assert secret not in logged


@both
async def test_token_and_user_together_are_refused(tmp_path: Path) -> None:
    async with serving(auth_file=users_file(tmp_path)) as server:
        with pytest.raises(ValueError, match="not both"):
            async with pybroker.connect(server.url, token=TOKEN, user="alice", password=PASSWORD):
                pass
        # Sent raw (both options in HELLO): refused by the broker too.
        auth = server.broker.auth
        assert auth is not None
        assert await auth.hello({"token": TOKEN, "user": "alice", "password": PASSWORD}) is None
        assert (await auth.hello({"token": TOKEN, "extra": "ignored"})) is not None


@both
async def test_without_auth_credentials_are_ignored() -> None:
    async with serving() as server:
        assert server.broker.auth is None
        with anyio.fail_after(TIMEOUT):
            async with pybroker.connect(server.url, token=TOKEN) as c:
                await c.publish("a", b"x")


async def test_scrypt_runs_in_worker_threads_bounded_by_a_limiter(tmp_path: Path) -> None:
    auth = Authenticator(Users.load(users_file(tmp_path)), threads=1)
    with trio.fail_after(TIMEOUT):
        results = []
        async with trio.open_nursery() as nursery:
            for pw in (PASSWORD, "nope", PASSWORD):

                async def check(pw: str = pw) -> None:
                    results.append(await auth.by_password("alice", pw))

                nursery.start_soon(check)
            while auth.limiter.borrowed_tokens == 0 and len(results) < 3:
                await trio.sleep(0)
            assert auth.limiter.borrowed_tokens <= 1
    assert sorted(u is not None for u in results) == [False, True, True]


# -- HTTP -----------------------------------------------------------------------


async def test_http_needs_credentials_except_for_probes(tmp_path: Path) -> None:
    async with running_broker(auth_file=users_file(tmp_path)) as server:
        port = server.http_port
        assert port is not None
        for path in ("/healthz", "/readyz"):
            status, _, _ = await http_request(port, "GET", path)
            assert status == 200
        for auth in (None, "Bearer wrong-token-xxxxxxxxxx", "Bearer ", basic("alice", "wrong"),
                     basic("mallory", PASSWORD), "Basic !!!", "Digest abc", TOKEN):
            status, headers, body = await http_request(port, "GET", "/v1/topics", auth=auth)
            assert status == 401, (auth, body)
            assert "Bearer" in headers["www-authenticate"]
            assert body["code"] == "unauthorized"
            assert TOKEN not in json.dumps(body)
        status, _, body = await http_request(port, "GET", "/v1/topics", auth=f"Bearer {TOKEN}")
        assert status == 200 and body == {"topics": []}
        status, _, body = await http_request(port, "GET", "/v1/topics", auth=basic("alice", PASSWORD))
        assert status == 200


async def test_http_permissions(tmp_path: Path) -> None:
    async with running_broker(auth_file=users_file(tmp_path)) as server:
        port = server.http_port
        assert port is not None
        alice = basic("alice", PASSWORD)
        ingest = f"Bearer {TOKEN}"
        ops = f"Bearer {ADMIN_TOKEN}"
        msg = {"payload": "hi"}
        # publish: allowed and denied
        status, _, body = await http_request(port, "POST", "/v1/topics/orders.eu/messages", auth=alice, body=msg)
        assert status == 200 and body["offset"] == 0, body
        status, _, body = await http_request(port, "POST", "/v1/topics/billing.x/messages", auth=alice, body=msg)
        assert status == 403 and body["code"] == "permission_denied", body
        assert "billing.x" not in server.broker.router.topics
        status, _, _ = await http_request(port, "POST", "/v1/topics/secret.x/messages", auth=ingest, body=msg)
        assert status == 200
        # read: fetch, detail, events; lists show only readable topics
        status, _, body = await http_request(port, "GET", "/v1/topics/orders.eu/messages", auth=alice)
        assert status == 200 and [m["payload"] for m in body["messages"]] == ["hi"]
        for path in ("/v1/topics/secret.x/messages", "/v1/topics/secret.x", "/v1/topics/secret.x/events"):
            status, _, body = await http_request(port, "GET", path, auth=alice)
            assert status == 403, (path, body)
        status, _, body = await http_request(port, "GET", "/v1/topics", auth=alice)
        assert [t["name"] for t in body["topics"]] == ["orders.eu"]
        status, _, body = await http_request(port, "GET", "/v1/topics", auth=ingest)
        assert [t["name"] for t in body["topics"]] == []  # ingest reads only public.>
        # broker-wide figures: admin only
        for path in ("/metrics", "/v1/broker"):
            status, _, _ = await http_request(port, "GET", path, auth=ingest)
            assert status == 403, path
            status, _, _ = await http_request(port, "GET", path, auth=ops)
            assert status == 200, path


def test_users_toml_helper_round_trips() -> None:
    # The test helper writes the format the broker reads.
    text = users_toml({"u": user_entry(token=TOKEN, publish=["a.>"], subscribe_deny=["b"], admin=True)})
    users = Users.parse(text)
    perms = users.by_name["u"].permissions
    assert perms.publish_allow == ("a.>",) and perms.subscribe_deny == ("b",) and perms.admin


# -- on the wire ------------------------------------------------------------------


async def test_auth_failed_is_fatal_on_the_wire_and_nothing_else_is_served(tmp_path: Path) -> None:
    async with running_broker(auth_file=users_file(tmp_path)) as server:
        async with raw_client(server) as raw:
            await raw.send_event(Hello(client_name="raw", options={"user": "alice", "password": "nope"}))
            error = await expect_fatal(raw, ErrorCode.AUTH_FAILED)
            assert error.message == "authentication failed"
        async with raw_client(server) as raw:
            await raw.send_event(Hello(client_name="raw", options={"token": TOKEN, "future-key": "x"}))
            welcome = await raw.next_event()
            assert isinstance(welcome, Welcome), welcome


async def test_the_handshake_timeout_covers_checking_credentials(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def never(self: Authenticator, options: object) -> None:
        await trio.sleep_forever()

    monkeypatch.setattr(Authenticator, "hello", never)
    async with running_broker(auth_file=users_file(tmp_path), handshake_timeout=0.2) as server:
        with trio.fail_after(TIMEOUT), structlog.testing.capture_logs() as logs:
            with pytest.raises(pybroker.AuthenticationError):
                async with pybroker.connect(server.url, token=TOKEN):
                    pass
        assert [e["reason"] for e in logs if e["event"] == "authentication failed"] == ["timed out"]


@both
async def test_a_request_to_a_forbidden_topic_is_refused(tmp_path: Path) -> None:
    async with serving(auth_file=users_file(tmp_path)) as server:
        async with pybroker.connect(server.url, user="alice", password=PASSWORD) as alice:
            with anyio.fail_after(TIMEOUT), pytest.raises(pybroker.PermissionDenied):
                await alice.request("billing.lookup", b"?")


async def test_the_dashboard_needs_a_user(tmp_path: Path) -> None:
    async with running_broker(auth_file=users_file(tmp_path)) as server:
        assert server.http_port is not None
        status, _, _ = await http_request(server.http_port, "GET", "/")
        assert status == 401
        status, _, _ = await http_request(server.http_port, "GET", "/", auth=basic("alice", PASSWORD))
        assert status == 200
