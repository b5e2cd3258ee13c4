"""The ``pybroker`` command: serve, pub, sub, groups, topics, auth, bench.

This module assembles the parser from the commands' modules and runs the
one asked for, turning what escapes it into an exit status:

- ``flags.py``: the ``pybroker`` parser before any command, flag value
  types, the client commands' connection flags;
- ``serve.py``: ``serve`` (flags, the ``Config`` they describe, the server);
- ``tools.py``: the client commands ``pub``, ``sub``, ``groups``, ``topics``;
- ``auth.py``: ``auth`` (hashes for a users file, checking one);
- ``bench`` is ``pybroker.server.bench``, imported only when it is run.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Sequence

import trio

from ..logs import configure
from . import auth, serve, tools
from .flags import DEFAULT_CA, DEFAULT_URL, command_parser

__all__ = ["DEFAULT_CA", "DEFAULT_URL", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser, commands = command_parser()
    serve.add_parser(commands)
    tools.add_parsers(commands)
    auth.add_parser(commands)
    # Listed here for --help; main() hands `bench ...` to pybroker.server.bench, imported only then.
    bench = commands.add_parser("bench", help="benchmarks with verified delivery (pybroker bench --help)", add_help=False)
    bench.add_argument("bench_args", nargs=argparse.REMAINDER, help="the scenario and its flags (pybroker bench --help lists them)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    if words[:1] == ["bench"]:
        # Imported here, not at the top: the bench imports this package (for
        # the serve flags), and nothing imports the bench when it is loaded,
        # so there is no import cycle.
        from ..bench import main as bench_main

        return bench_main(words[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "serve":
            configure(args.log_level, args.log_format)
            try:
                return trio.run(serve.serve, args)
            except ValueError as exc:  # bad settings, users file, unsafe listen address
                parser.error(str(exc))
        if args.command == "auth":
            return auth.run(args)
        configure("warning", "console")
        if args.command == "pub":
            return trio.run(tools.pub, args)
        if args.command == "topics":
            return trio.run(tools.topics, args)
        if args.command == "groups":
            return trio.run(tools.groups, args)
        return trio.run(tools.sub, args)
    except KeyboardInterrupt:
        return 130
    except OSError as exc:
        print(f"pybroker: {exc}", file=sys.stderr)
        return 1
    except BaseExceptionGroup as group:
        # Nurseries wrap what their tasks raise; report the plain cases plainly.
        leaves = list(_leaves(group))
        if all(isinstance(e, KeyboardInterrupt) for e in leaves):
            return 130
        if len(leaves) == 1 and isinstance(leaves[0], OSError):
            print(f"pybroker: {leaves[0]}", file=sys.stderr)
            return 1
        raise


def _leaves(group: BaseExceptionGroup[BaseException]) -> Iterator[BaseException]:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            yield from _leaves(exc)
        else:
            yield exc
