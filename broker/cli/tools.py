"""The client commands: ``pybroker pub``, ``sub``, ``groups`` and ``topics``,
their flags, the connection they open and how they print what they get."""

from __future__ import annotations

import argparse
import base64
import datetime as _dt
import getpass
import json
import os
import ssl
import sys
from typing import Any

from .flags import Commands, add_connection_flags


def add_parsers(commands: Commands[argparse.ArgumentParser]) -> None:
    pub = commands.add_parser("pub", help="publish a message (or one per line of stdin)")
    pub.add_argument("topic")
    pub.add_argument("message", nargs="?", default="-", help="the payload; '-' or nothing reads lines from stdin")
    pub.add_argument("--header", "-H", action="append", default=[], metavar="KEY=VALUE")
    add_connection_flags(pub)

    sub = commands.add_parser("sub", help="print messages as they arrive, until interrupted")
    sub.add_argument("pattern", help="topic or pattern: '*' matches one token, '>' the rest")
    add_connection_flags(sub)
    start = sub.add_mutually_exclusive_group()
    start.add_argument("--from", dest="start", choices=("new", "earliest"), default="new", help="where to start (default new)")
    start.add_argument("--from-offset", type=int, metavar="N", help="start at offset N (a topic, not a pattern)")
    start.add_argument("--since", metavar="TIME", help="start at the first message at or after an ISO 8601 time")
    sub.add_argument("--group", metavar="NAME", help="join consumer group NAME: each message to one member, acknowledged once printed")
    sub.add_argument("--count", type=int, default=0, metavar="N", help="exit after N messages")
    sub.add_argument("--json", action="store_true", help="one JSON object per line")
    sub.add_argument(
        "--no-reconnect",
        dest="reconnect",
        action="store_false",
        help="exit when the connection is lost (default: reconnect and resume, without gaps)",
    )

    groups = commands.add_parser(
        "groups", help="consumer groups: list, inspect NAME, delete NAME, create NAME --topic PATTERN"
    )
    groups.add_argument("action", nargs="?", choices=("list", "inspect", "delete", "create"), default="list")
    groups.add_argument("name", nargs="?", default="")
    add_connection_flags(groups)
    groups.add_argument("--json", action="store_true", help="print the broker's JSON answer")
    create = groups.add_argument_group("create (a durable group before its first worker)")
    create.add_argument("--topic", metavar="PATTERN", help="the topic or pattern the group reads")
    create.add_argument(
        "--from", dest="start", default="new", metavar="earliest|new|OFFSET|TIME",
        help="where it starts: earliest retained, new (published from now; default), "
        "an offset (a topic, not a pattern) or an ISO 8601 time",
    )
    create.add_argument("--ack-wait", type=float, metavar="SECONDS")
    create.add_argument("--max-deliver", type=int, metavar="N", help="deliveries before dead-lettering; 0: unlimited")
    create.add_argument("--backoff", metavar="S,S,...", help="seconds a nak'ed job waits, per delivery (last repeats)")
    create.add_argument("--backoff-jitter", type=float, metavar="FRACTION")
    create.add_argument("--max-ack-pending", type=int, metavar="N", help="prefetch of members that name none")
    create.add_argument("--dead-letter", metavar="TOPIC")

    topics = commands.add_parser("topics", help="list topics with their first and next offsets")
    topics.add_argument("pattern", nargs="?", default=">", help="topic pattern (default: every topic)")
    add_connection_flags(topics)
    topics.add_argument("--json", action="store_true", help="one JSON object per line")


def _connect(args: argparse.Namespace, **options: Any) -> Any:
    """pybroker.connect() with the command's credentials (else the URL's user info)."""
    import pybroker

    if args.user:
        password = os.environ.get("PYBROKER_PASSWORD")
        if password is None:
            password = getpass.getpass(f"password for {args.user}: ")
        return pybroker.connect(
            args.url, name="pybroker-cli", user=args.user, password=password, ca_file=args.ca, **options
        )
    return pybroker.connect(
        args.url, name="pybroker-cli", token=args.token or None, ca_file=args.ca, **options
    )


# -- pub / sub ------------------------------------------------------------


def _headers(pairs: list[str]) -> dict[str, str]:
    headers = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"pybroker pub: --header wants KEY=VALUE, got {pair!r}")
        headers[key] = value
    return headers


async def pub(args: argparse.Namespace) -> int:
    import pybroker

    headers = _headers(args.header) or None
    try:
        async with _connect(args) as c:
            if args.message != "-":
                ack = await c.publish(args.topic, args.message.encode(), headers)
                print(f"published to {ack.topic} at offset {ack.offset} ({ack.durability.name.lower()})")
                return 0
            pending = []
            for line in sys.stdin:
                pending.append(await c.send(args.topic, line.rstrip("\n").encode(), headers))
            await c.flush()
            acks = [await p.wait() for p in pending]
            if acks:
                print(f"published {len(acks)} messages to {args.topic}, offsets {acks[0].offset}..{acks[-1].offset}")
            else:
                print("nothing to publish (stdin was empty)")
            return 0
    except (pybroker.BrokerError, pybroker.ConnectionClosed, ValueError, ssl.SSLError) as exc:
        print(f"pybroker pub: {exc}", file=sys.stderr)
        return 1


def _format(msg: Any, as_json: bool) -> str:
    if as_json:
        try:
            payload: dict[str, str] = {"payload": msg.payload.decode("utf-8")}
        except UnicodeDecodeError:
            payload = {"payload_base64": base64.b64encode(msg.payload).decode()}
        return json.dumps(
            {
                "topic": msg.topic,
                "offset": msg.offset,
                "timestamp": msg.datetime.isoformat(),
                "headers": dict(msg.headers),
                **payload,
            }
        )
    text = msg.payload.decode("utf-8", "backslashreplace")
    headers = "".join(f" {k}={v}" for k, v in msg.headers.items())
    return f"{msg.topic} [{msg.offset}]{headers} {text}"


async def sub(args: argparse.Namespace) -> int:
    import pybroker

    start: Any = args.start
    if args.from_offset is not None:
        start = args.from_offset
    elif args.since:
        since = _dt.datetime.fromisoformat(args.since)
        start = since if since.tzinfo else since.astimezone()
    try:
        async with _connect(args, reconnect=args.reconnect) as c:
            async with c.subscribe(args.pattern, start=start, group=args.group) as subscription:
                seen = 0
                async for msg in subscription:
                    print(_format(msg, args.json), flush=True)
                    if msg.is_group_message:
                        await msg.ack()
                    seen += 1
                    if args.count and seen >= args.count:
                        break
        return 0
    except (pybroker.BrokerError, pybroker.ConnectionClosed, ValueError, ssl.SSLError) as exc:
        print(f"pybroker sub: {exc}", file=sys.stderr)
        return 1


# -- groups / topics ------------------------------------------------------


async def groups(args: argparse.Namespace) -> int:
    import pybroker

    if args.action != "list" and not args.name:
        print(f"pybroker groups {args.action}: a group NAME is needed", file=sys.stderr)
        return 2
    if (args.action == "create") != (args.topic is not None):
        print("pybroker groups: --topic PATTERN goes with create (and create needs it)", file=sys.stderr)
        return 2
    try:
        async with _connect(args) as c:
            if args.action == "create":
                doc = await c.create_group(
                    args.name,
                    args.topic,
                    start=_group_start(args.start),
                    ack_wait=args.ack_wait,
                    max_deliver=args.max_deliver,
                    backoff=[float(s) for s in args.backoff.split(",")] if args.backoff else None,
                    backoff_jitter=args.backoff_jitter,
                    max_ack_pending=args.max_ack_pending,
                    dead_letter=args.dead_letter,
                )
            else:
                doc = await c.groups(args.action, args.name)
    except (pybroker.BrokerError, pybroker.ConnectionClosed, ValueError, ssl.SSLError) as exc:
        print(f"pybroker groups: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(doc, indent=2))
    elif args.action == "delete":
        print(f"deleted group {doc['deleted']}")
    elif args.action == "create":
        verb = "created group" if doc["created"] else "group exists (settings unchanged):"
        topics = ", ".join(f"{t} from offset {v['cursor']}" for t, v in sorted(doc["topics"].items()))
        print(f"{verb} {doc['group']}  pattern={doc['pattern']}" + (f"  ({topics})" if topics else ""))
    else:
        summaries = doc["groups"] if args.action == "list" else [doc]
        if not summaries:
            print("no groups")
        for g in summaries:
            print(
                f"{g['group']}  pattern={g['pattern']}  members={g['members']}  "
                f"in_flight={g.get('in_flight', 0)}  pending={g['pending']}  delivered={g['delivered']}  "
                f"redelivered={g['redelivered']}  dead_lettered={g['dead_lettered']}"
            )
            if args.action == "inspect":
                for topic, t in sorted(g["topics"].items()):
                    print(f"  {topic}: next offset {t['cursor']}, pending {t['pending']}")
    return 0


def _group_start(text: str) -> Any:
    """--from: earliest, new, an offset, or an ISO 8601 time (local if no zone)."""
    if text in ("earliest", "new"):
        return text
    if text.isdigit():
        return int(text)
    try:
        when = _dt.datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"--from: earliest, new, an offset or an ISO 8601 time, not {text!r}") from None
    return when if when.tzinfo else when.astimezone()


async def topics(args: argparse.Namespace) -> int:
    import pybroker

    try:
        async with _connect(args) as c:
            infos = await c.topics(args.pattern)
    except (pybroker.BrokerError, pybroker.ConnectionClosed, ValueError, ssl.SSLError) as exc:
        print(f"pybroker topics: {exc}", file=sys.stderr)
        return 1
    if args.json:
        for info in infos:
            print(json.dumps(
                {
                    "topic": info.topic,
                    "first_offset": info.first_offset,
                    "next_offset": info.next_offset,
                    "retained_bytes": info.retained_bytes,
                    "subscriptions": info.subscriptions,
                }
            ))
        return 0
    if not infos:
        print("no topics")
        return 0
    width = max(len(i.topic) for i in infos)
    print(f"{'TOPIC':<{width}}  {'FIRST':>10}  {'NEXT':>10}  {'BYTES':>12}  SUBS")
    for i in infos:
        print(f"{i.topic:<{width}}  {i.first_offset:>10}  {i.next_offset:>10}  {i.retained_bytes:>12}  {i.subscriptions}")
    return 0
