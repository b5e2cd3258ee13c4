"""Users files for the authentication and permission tests.

Passwords are hashed with cheap scrypt parameters (n=16, r=1): the hash
format carries them, so the broker checks them as cheaply, while the
default stays strong. Every file is real TOML in the test's tmp_path.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pybroker.server.auth import hash_password, hash_token

CHEAP = {"n": 16, "r": 1, "p": 1}


def user_entry(
    *,
    password: str | None = None,
    token: str | None = None,
    publish: Sequence[str] = (),
    publish_deny: Sequence[str] = (),
    subscribe: Sequence[str] = (),
    subscribe_deny: Sequence[str] = (),
    admin: bool = False,
    manage: Sequence[str] = (),
) -> dict[str, Any]:
    entry: dict[str, Any] = {}
    if password is not None:
        entry["password"] = hash_password(password, **CHEAP)
    if token is not None:
        entry["token"] = hash_token(token)
    entry["publish"] = {"allow": list(publish), "deny": list(publish_deny)}
    entry["subscribe"] = {"allow": list(subscribe), "deny": list(subscribe_deny)}
    if admin:
        entry["admin"] = True
    if manage:
        entry["manage"] = {"allow": list(manage)}
    return entry


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(value)


def users_toml(users: Mapping[str, Mapping[str, Any]]) -> str:
    lines = []
    for name, entry in users.items():
        lines.append(f"[users.{json.dumps(name)}]")
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in entry.items())
        lines.append("")
    return "\n".join(lines)


def write_users(tmp_path: Path, users: Mapping[str, Mapping[str, Any]]) -> Path:
    path = tmp_path / "users.toml"
    path.write_text(users_toml(users), encoding="utf-8")
    return path
