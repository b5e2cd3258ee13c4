"""``pybroker auth``: make password and token hashes for a users file, check
one. Runs offline: no broker, no connection."""

from __future__ import annotations

import argparse
import getpass
import sys
from pathlib import Path

from ..auth import DEFAULT_SCRYPT_N, Users, hash_password, hash_token, new_token
from .flags import Commands


def add_parser(commands: Commands[argparse.ArgumentParser]) -> None:
    auth = commands.add_parser("auth", help="make password and token hashes for a users file, check one")
    steps = auth.add_subparsers(dest="auth_command", required=True, metavar="ACTION")
    hp = steps.add_parser("hash-password", help="read a password (prompt, or stdin's first line) and print its scrypt hash")
    hp.add_argument("--scrypt-n", type=int, default=DEFAULT_SCRYPT_N, metavar="N", help=f"scrypt cost, a power of two (default {DEFAULT_SCRYPT_N})")
    steps.add_parser("hash-token", help="read a token (prompt, or stdin's first line) and print its hash")
    steps.add_parser("new-token", help="print a new random token and, on the next line, its hash for the users file")
    check = steps.add_parser("check", help="check a users file and list its users")
    check.add_argument("file", type=Path, help="the users file (TOML) to check")


def _read_secret(what: str) -> str:
    """From a prompt on a terminal (asked twice), else stdin's first line:
    never from argv, where other users could see it in the process list."""
    if sys.stdin.isatty():
        first = getpass.getpass(f"{what}: ")
        if getpass.getpass(f"{what} again: ") != first:
            raise ValueError(f"the two {what}s differ")
        return first
    return sys.stdin.readline().rstrip("\r\n")


def run(args: argparse.Namespace) -> int:
    try:
        if args.auth_command == "hash-password":
            print(hash_password(_read_secret("password"), n=args.scrypt_n))
        elif args.auth_command == "hash-token":
            print(hash_token(_read_secret("token")))
        elif args.auth_command == "new-token":
            token = new_token()
            print(token)
            print(hash_token(token))
        else:
            users = Users.load(args.file)
            for user in users.by_name.values():
                kinds = [k for k, v in (("password", user.password), ("token", user.token_digest)) if v is not None]
                print(f"{user.name}: {' and '.join(kinds)}{', admin' if user.permissions.admin else ''}")
    except ValueError as exc:
        print(f"pybroker auth {args.auth_command}: {exc}", file=sys.stderr)
        return 1
    return 0
