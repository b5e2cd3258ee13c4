"""What several ``pybroker`` commands (and ``pybroker bench``) parse alike.

The ``pybroker`` parser before any command is added to it, the value types of
flags (durations, seconds, positive integers), and the connection flags of
the client commands (``--url``, ``--token``/``--user``, ``--ca``). Flags
only: what a command does with them is in its own module.
"""

from __future__ import annotations

import argparse
import os

from .. import __version__
from ..config import DEFAULT_HOST, DEFAULT_PORT

DEFAULT_URL = os.environ.get("PYBROKER_URL", f"pybroker://{DEFAULT_HOST}:{DEFAULT_PORT}")
DEFAULT_CA = os.environ.get("PYBROKER_CA") or None

Commands = argparse._SubParsersAction  # what add_subparsers() returns; argparse does not export it


def command_parser() -> tuple[argparse.ArgumentParser, Commands[argparse.ArgumentParser]]:
    """The ``pybroker`` parser and its (still empty) list of commands."""
    parser = argparse.ArgumentParser(prog="pybroker", description="A durable pub/sub broker on Trio.")
    parser.add_argument("--version", action="version", version=f"pybroker {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    return parser, commands


def add_connection_flags(parser: argparse.ArgumentParser) -> None:
    """--url, --token, --user and --ca, in that order, for a client command."""
    parser.add_argument("--url", default=DEFAULT_URL, help=f"broker URL (default {DEFAULT_URL}, or $PYBROKER_URL)")
    parser.add_argument("--token", default=os.environ.get("PYBROKER_TOKEN"), help="authentication token (default $PYBROKER_TOKEN)")
    parser.add_argument("--user", default=os.environ.get("PYBROKER_USER"), help="user name (default $PYBROKER_USER); the password comes from $PYBROKER_PASSWORD or a prompt")
    parser.add_argument("--ca", default=DEFAULT_CA, metavar="FILE", help="verify the broker's TLS certificate against the CAs in this PEM file, and connect over TLS (default $PYBROKER_CA; pybrokers:// URLs without it use the system's CAs)")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return value


def seconds(text: str) -> float:
    """A duration that is finite and not negative."""
    value = duration(text)
    if value < 0 or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError(f"not a usable number of seconds: {text!r}")
    return value


def positive_seconds(text: str) -> float:
    value = seconds(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"must be more than 0: {text!r}")
    return value


def duration(text: str) -> float:
    """Seconds, or a number with s/m/h/d."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        if text and text[-1] in units:
            return float(text[:-1]) * units[text[-1]]
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 3600, 90m, 12h, 7d)") from None
