"""``pybroker serve --auth``, ``pybroker auth ...`` and client credentials,
run as real subprocesses (tests/helpers/procs.py; every wait bounded)."""

from __future__ import annotations

from pathlib import Path

from pybroker.server.auth import Users, hash_token, verify_password

from helpers.auth import CHEAP, user_entry, write_users
from helpers.procs import find_event, run, serve

TOKEN = "cli-token-0123456789abcdef"
PASSWORD = "pa55 word"


def users(tmp_path: Path) -> Path:
    return write_users(
        tmp_path,
        {
            "writer": user_entry(token=TOKEN, publish=["cli.>"]),
            "reader": user_entry(password=PASSWORD, subscribe=["cli.>"]),
        },
    )


async def test_serve_refuses_a_public_address_without_auth(tmp_path: Path) -> None:
    result = await run(["serve", "--host", "0.0.0.0", "--port", "0", "--data-dir", str(tmp_path / "d")])
    assert result.returncode == 2, result
    err = result.stderr.decode()
    assert "without authentication" in err and "--allow-anonymous-remote" in err and "--auth" in err
    assert not (tmp_path / "d").exists()  # refused before touching the data directory


async def test_serve_refuses_a_malformed_users_file(tmp_path: Path) -> None:
    bad = tmp_path / "users.toml"
    bad.write_text('[users.writer]\ntoken = "in-clear-token-0123456789"\n')
    result = await run(["serve", "--port", "0", "--auth", str(bad), "--data-dir", str(tmp_path / "d")])
    assert result.returncode == 2, result
    err = result.stderr.decode()
    assert "user 'writer'" in err and "never stored in clear" in err


async def test_serve_without_auth_says_so_in_its_startup_log(tmp_path: Path) -> None:
    async with serve(tmp_path) as broker:
        event = await broker.child.stderr.wait_for(find_event("no authentication configured (no --auth); listening on loopback only"))
        assert event["level"] == "info"


async def test_serve_with_auth_end_to_end(tmp_path: Path) -> None:
    async with serve(tmp_path, "--auth", str(users(tmp_path))) as broker:
        await broker.child.stderr.wait_for(find_event("authentication required"))
        url = broker.url
        ok = await run(["pub", "cli.a", "hello", "--url", url, "--token", TOKEN])
        assert ok.returncode == 0, ok
        assert ok.stdout.decode() == "published to cli.a at offset 0 (disk)\n"
        from_env = await run(["pub", "cli.a", "again", "--url", url], env={"PYBROKER_TOKEN": TOKEN})
        assert from_env.returncode == 0, from_env
        missing = await run(["pub", "cli.a", "x", "--url", url])
        assert missing.returncode == 1 and "AUTH_FAILED (106)" in missing.stderr.decode(), missing
        denied = await run(["pub", "other.a", "x", "--url", url, "--token", TOKEN])
        assert denied.returncode == 1 and "PERMISSION_DENIED (211)" in denied.stderr.decode(), denied
        got = await run(
            ["sub", "cli.a", "--from", "earliest", "--count", "2", "--url", url, "--user", "reader"],
            env={"PYBROKER_PASSWORD": PASSWORD},
        )
        assert got.returncode == 0, got
        assert got.stdout.decode().splitlines() == ["cli.a [0] hello", "cli.a [1] again"]
        sub_denied = await run(
            ["sub", "cli.a", "--count", "1", "--url", url.replace("://", f"://writer-is-not-a-user:{PASSWORD}@".replace(" ", "%20"))],
        )
        assert sub_denied.returncode == 1 and "AUTH_FAILED" in sub_denied.stderr.decode(), sub_denied
        topics = await run(["topics", "--url", url, "--user", "reader"], env={"PYBROKER_PASSWORD": PASSWORD})
        assert topics.returncode == 0 and "cli.a" in topics.stdout.decode(), topics
        logs = broker.child.stderr.text()
        assert TOKEN not in logs and PASSWORD not in logs


async def test_auth_commands_make_hashes_from_stdin(tmp_path: Path) -> None:
    hashed = await run(["auth", "hash-password", "--scrypt-n", str(CHEAP["n"])], stdin=b"s3cret word\n")
    assert hashed.returncode == 0, hashed
    encoded = hashed.stdout.decode().strip()
    assert encoded.startswith("scrypt$n=16,") and verify_password("s3cret word", encoded)
    token_hash = await run(["auth", "hash-token"], stdin=f"{TOKEN}\n".encode())
    assert token_hash.stdout.decode().strip() == hash_token(TOKEN)
    short = await run(["auth", "hash-token"], stdin=b"short\n")
    assert short.returncode == 1 and "at least 16" in short.stderr.decode()
    made = await run(["auth", "new-token"])
    token, digest = made.stdout.decode().split()
    assert len(token) >= 32 and digest == hash_token(token)
    path = tmp_path / "users.toml"
    path.write_text(f'[users.svc]\ntoken = "{digest}"\npassword = "{encoded}"\n')
    assert set(Users.load(path).by_name) == {"svc"}
    checked = await run(["auth", "check", str(path)])
    assert checked.returncode == 0 and checked.stdout.decode() == "svc: password and token\n", checked
    path.write_text("[users.svc]\n")
    bad = await run(["auth", "check", str(path)])
    assert bad.returncode == 1 and "user 'svc'" in bad.stderr.decode()
