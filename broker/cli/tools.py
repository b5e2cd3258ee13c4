"""The client commands: ``pybroker pub``, ``sub``, ``groups`` and ``topics``,
their flags, the connection they open and how they print what they get."""

from __future__ import annotations

import argparse
import base64
import datetime as _dt
import getpass
import json
import os
import socket
import ssl
import sys
from typing import Any

from .flags import Commands, add_connection_flags, seconds


def add_parsers(commands: Commands[argparse.ArgumentParser]) -> None:
    pub = commands.add_parser("pub", help="publish a message, one per line of stdin, or a whole file")
    pub.add_argument("topic", help="the topic to publish to")
    pub.add_argument("message", nargs="?", default=None, help="the payload (its bytes as given); without it, each line of stdin is a message")
    one = pub.add_mutually_exclusive_group()
    one.add_argument("--file", metavar="FILE", help="publish FILE's bytes as one message ('-': all of stdin)")
    one.add_argument("--raw", action="store_true", help="publish all of stdin as one message, bytes as they are (the same as --file -)")
    pub.add_argument("--header", "-H", action="append", default=[], metavar="KEY=VALUE", help="a header for every message published (repeatable)")
    pub.add_argument("--delay", type=seconds, default=None, metavar="AGE", help="have the broker publish it this long from now (delayed delivery; e.g. 90s, 10m, 2h)")
    add_connection_flags(pub)

    sub = commands.add_parser("sub", help="print messages as they arrive, until interrupted")
    sub.add_argument("pattern", help="topic or pattern: '*' matches one token, '>' the rest")
    add_connection_flags(sub)
    start = sub.add_mutually_exclusive_group()
    start.add_argument("--from", dest="start", choices=("new", "earliest"), default="new", help="where to start (default new)")
    start.add_argument("--from-offset", type=int, metavar="N", help="start at offset N (a topic, not a pattern)")
    start.add_argument("--since", type=since, metavar="TIME", help="start at the first message at or after TIME: ISO 8601 (2026-12-05T09:00, local time unless it has an offset) or a duration ago (90s, 10m, 2h, 1d)")
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
    groups.add_argument("action", nargs="?", choices=("list", "inspect", "delete", "create"), default="list", help="what to do (default list)")
    groups.add_argument("name", nargs="?", default="", help="the group, for inspect, delete and create")
    add_connection_flags(groups)
    groups.add_argument("--json", action="store_true", help="print the broker's JSON answer")
    create = groups.add_argument_group("create (a durable group before its first worker)")
    create.add_argument("--topic", metavar="PATTERN", help="the topic or pattern the group reads")
    create.add_argument(
        "--from", dest="start", default="new", metavar="earliest|new|OFFSET|TIME",
        help="where it starts: earliest retained, new (published from now; default), "
        "an offset (a topic, not a pattern) or an ISO 8601 time",
    )
    create.add_argument("--ack-wait", type=float, metavar="SECONDS", help="seconds a delivery may stay unsettled before it is delivered again")
    create.add_argument("--max-deliver", type=int, metavar="N", help="deliveries before dead-lettering; 0: unlimited")
    create.add_argument("--backoff", metavar="S,S,...", help="seconds a nak'ed job waits, per delivery (last repeats)")
    create.add_argument("--backoff-jitter", type=float, metavar="FRACTION", help="lengthen each backoff wait by up to this fraction, at random")
    create.add_argument("--max-ack-pending", type=int, metavar="N", help="prefetch of members that name none")
    create.add_argument("--dead-letter", metavar="TOPIC", help="where messages go after --max-deliver deliveries (default dlq.NAME)")
    create.add_argument("--ordering", choices=("key",), default=None, help="key: messages with the same 'key' header one at a time, in order")

    topics = commands.add_parser("topics", help="list topics with their first and next offsets; create, delete, purge or set NAME")
    topics.add_argument("pattern", nargs="?", default=">", help="topic pattern (default: every topic), or 'create', 'delete', 'purge' or 'set'")
    topics.add_argument("name", nargs="?", default=None, help="with 'create', 'delete', 'purge' or 'set': the topic (admin, or a manage permission)")
    topics.add_argument("settings", nargs="*", default=[], metavar="KEY=VALUE", help="with 'set': retention_bytes, retention_seconds (e.g. 7d; none: no limit) or segment_bytes")
    topics.add_argument("--partitions", type=int, default=None, metavar="N", help="with 'create': the topic's partitions, NAME~0 to NAME~N-1 (default 1)")
    topics.add_argument("--keep-from", type=int, default=None, metavar="OFFSET", help="with 'purge': keep messages from the stored batch holding OFFSET on (default: purge them all)")
    add_connection_flags(topics)
    topics.add_argument("--json", action="store_true", help="one JSON object per line")


def failure(url: str, exc: BaseException) -> str:
    """What went wrong, for a person: which broker could not be reached,
    and the likely fix where there is one."""
    import pybroker

    try:
        addresses = pybroker.parse_urls(url)
    except ValueError:
        return str(exc)
    host, port = addresses[0]
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the broker's host {host!r} ({url}): {exc.strerror}"
    if isinstance(exc, ssl.SSLError):
        return str(exc)
    if isinstance(exc, OSError):
        # trio raises "all attempts to connect ... failed" from a group of
        # the attempts' errors: the first says why (refused, unreachable).
        cause: BaseException = exc
        if isinstance(exc.__cause__, BaseExceptionGroup) and exc.__cause__.exceptions:
            cause = exc.__cause__.exceptions[0]
        elif exc.__cause__ is not None:
            cause = exc.__cause__
        reason = os.strerror(cause.errno) if isinstance(cause, OSError) and cause.errno else str(cause)
        if len(addresses) > 1:  # each was tried; the error is the last one's
            return f"cannot connect to any of the brokers at {url}: {reason}"
        return f"cannot connect to the broker at {host}:{port}: {reason}"
    if isinstance(exc, pybroker.ConnectionClosed) and "no WELCOME" in str(exc) and url.startswith("pybroker://"):
        # A TLS port answers a plain HELLO by closing: say what to try.
        return f"{exc} (if {host}:{port} serves TLS, use pybrokers://{host}:{port})"
    return str(exc)


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


def since(text: str) -> _dt.datetime:
    """--since: an ISO 8601 time (local unless it says otherwise) or a
    duration ago."""
    try:
        when = _dt.datetime.fromisoformat(text)
    except ValueError:
        try:
            ago = seconds(text)
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(
                f"not a time: {text!r} (an ISO 8601 time such as 2026-12-05T09:00, or a duration ago such as 10m, 2h, 1d)"
            ) from None
        return _dt.datetime.now(_dt.timezone.utc) - _dt.timedelta(seconds=ago)
    return when if when.tzinfo else when.astimezone()


def _print(line: str) -> bool:
    """Print a line; False once stdout's reader has gone (a closed pipe)."""
    try:
        print(line, flush=True)
    except BrokenPipeError:
        # Python would complain again flushing stdout at exit: point it at
        # /dev/null, as the docs of signal/SIGPIPE suggest.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return False
    return True


def _headers(pairs: list[str]) -> dict[str, str]:
    headers = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"pybroker pub: --header wants KEY=VALUE, got {pair!r}")
        headers[key] = value
    return headers


def _whole_message(args: argparse.Namespace) -> bytes | None:
    """The one message --file, --raw or the argument gives, as bytes; None
    for one message per line of stdin. Arguments keep the bytes they came
    as (os.fsencode undoes the surrogates Python decoded them with)."""
    if args.raw or args.file == "-":
        return sys.stdin.buffer.read()
    if args.file is not None:
        try:
            with open(args.file, "rb") as f:
                return f.read()
        except OSError as exc:
            raise SystemExit(f"pybroker pub: cannot read {args.file}: {exc.strerror}") from None
    if args.message is not None and args.message != "-":
        return os.fsencode(args.message)
    return None


async def pub(args: argparse.Namespace) -> int:
    import pybroker

    headers = _headers(args.header) or None
    whole = _whole_message(args)
    try:
        async with _connect(args) as c:
            if args.delay is not None:
                lines = [whole] if whole is not None else [line.rstrip(b"\n") for line in sys.stdin.buffer]
                for payload in lines:
                    ack = await c.publish(args.topic, payload, headers, delay=args.delay)
                    if ack.deliver_at is None:
                        print(f"published to {ack.topic} at offset {ack.offset} ({ack.durability.name.lower()})")
                    else:
                        due = _dt.datetime.fromtimestamp(ack.deliver_at, _dt.timezone.utc).isoformat(timespec="milliseconds")
                        print(f"scheduled for {ack.topic} at {due} ({ack.durability.name.lower()})")
                return 0
            if whole is not None:
                ack = await c.publish(args.topic, whole, headers)
                print(f"published to {ack.topic} at offset {ack.offset} ({ack.durability.name.lower()})")
                return 0
            pending = []
            # Bytes, not text: a line that is not UTF-8 is published as it is.
            for line in sys.stdin.buffer:
                pending.append(await c.send(args.topic, line.rstrip(b"\n"), headers))
            await c.flush()
            acks = [await p.wait() for p in pending]
            if acks:
                print(f"published {len(acks)} messages to {args.topic}, offsets {acks[0].offset}..{acks[-1].offset}")
            else:
                print("nothing to publish (stdin was empty)")
            return 0
    except (pybroker.BrokerError, pybroker.ConnectionClosed, ValueError, OSError) as exc:
        print(f"pybroker pub: {failure(args.url, exc)}", file=sys.stderr)
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
                **({"msg_id": msg.msg_id} if msg.msg_id is not None else {}),
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
    elif args.since is not None:
        start = args.since
    try:
        async with _connect(args, reconnect=args.reconnect) as c:
            async with c.subscribe(args.pattern, start=start, group=args.group) as subscription:
                seen = 0
                async for msg in subscription:
                    if not _print(_format(msg, args.json)):
                        return 0  # the reader went away (`| head`): done, quietly
                    if msg.is_group_message:
                        await msg.ack()
                    seen += 1
                    if args.count and seen >= args.count:
                        break
        return 0
    except (pybroker.BrokerError, pybroker.ConnectionClosed, ValueError, OSError) as exc:
        print(f"pybroker sub: {failure(args.url, exc)}", file=sys.stderr)
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
                    ordering=args.ordering,
                )
            else:
                doc = await c.groups(args.action, args.name)
    except (pybroker.BrokerError, pybroker.ConnectionClosed, ValueError, OSError) as exc:
        print(f"pybroker groups: {failure(args.url, exc)}", file=sys.stderr)
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
            age = g.get("oldest_unacked_age_ms")
            print(
                f"{g['group']}  pattern={g['pattern']}  members={g['members']}  "
                f"in_flight={g.get('in_flight', 0)}  pending={g['pending']}  backlog={g.get('backlog', 0)}  "
                f"delivered={g['delivered']}  redelivered={g['redelivered']}  dead_lettered={g['dead_lettered']}  "
                f"oldest_unacked={'-' if age is None else f'{age / 1000:.1f}s'}"
            )
            if args.action == "inspect":
                for topic, t in sorted(g["topics"].items()):
                    print(f"  {topic}: next offset {t['cursor']}, pending {t['pending']}, backlog {t.get('backlog', 0)}")
                for m in g.get("member_list", []):
                    print(
                        f"  member {m['client'] or '(unnamed)'} {m['peer']} sub {m['sub_id']}: "
                        f"in_flight {m['in_flight']}/{m['prefetch']}, delivered {m['delivered']}, acked {m['acked']}"
                    )
                if g.get("members_omitted"):
                    print(f"  ... and {g['members_omitted']} more members")
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

    if args.name is not None:
        if args.pattern not in ("create", "delete", "purge", "set"):
            print(f"pybroker topics: {args.pattern!r} takes no topic name (did you mean 'delete {args.name}'?)", file=sys.stderr)
            return 2
        if args.keep_from is not None and args.pattern != "purge":
            print("pybroker topics: --keep-from goes with purge", file=sys.stderr)
            return 2
        if args.partitions is not None and args.pattern != "create":
            print("pybroker topics: --partitions goes with create", file=sys.stderr)
            return 2
        if (args.pattern == "set") != bool(args.settings):
            print("pybroker topics: KEY=VALUE settings go with set (and set needs some)", file=sys.stderr)
            return 2
        changes = dict(item.partition("=")[::2] for item in args.settings)
        try:
            async with _connect(args) as c:
                if args.pattern == "create":
                    doc = await c.create_topic(args.name, 1 if args.partitions is None else args.partitions)
                elif args.pattern == "delete":
                    doc = await c.delete_topic(args.name)
                elif args.pattern == "set":
                    doc = await c.set_topic(args.name, **changes)
                else:
                    doc = await c.purge_topic(args.name, args.keep_from)
        except (pybroker.BrokerError, pybroker.ConnectionClosed, ValueError, OSError) as exc:
            print(f"pybroker topics {args.pattern}: {failure(args.url, exc)}", file=sys.stderr)
            return 1
        if args.json:
            print(json.dumps(doc))
        elif args.pattern == "create":
            made = "created" if doc["created"] else "already exists as"
            print(f"{made} topic {doc['topic']} with {doc['partitions']} partition{'s' if doc['partitions'] > 1 else ''}")
        elif args.pattern == "delete":
            print(f"deleted topic {doc['deleted']} ({doc['messages']} messages)")
        elif args.pattern == "set":
            print(f"{doc['topic']}: " + ", ".join(f"{k}={v}" for k, v in sorted(doc["settings"].items())))
        else:
            print(f"purged {doc['purged']} messages of {doc['topic']}: it now holds offsets {doc['first_offset']}..{doc['next_offset'] - 1}")
        return 0
    try:
        async with _connect(args) as c:
            infos = await c.topics(args.pattern)
    except (pybroker.BrokerError, pybroker.ConnectionClosed, ValueError, OSError) as exc:
        print(f"pybroker topics: {failure(args.url, exc)}", file=sys.stderr)
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
