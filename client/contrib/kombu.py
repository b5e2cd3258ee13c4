# kombu's virtual transport (the base classes here) has no annotations:
# calling its methods is an untyped call by mypy --strict's rules.
# mypy: disable-error-code="no-untyped-call"
"""A kombu transport, so that Celery (and any kombu user) runs on pybroker::

    import pybroker.contrib.kombu          # registers the pybroker:// scheme with kombu
    app = Celery("tasks", broker="pybroker://127.0.0.1:7420")

kombu has no entry point for transports: its table of URL schemes,
``kombu.transport.TRANSPORT_ALIASES``, is the registry, and importing this
module adds ``pybroker`` to it. Without the import, name the class instead:
``Celery(broker="pybroker://...", broker_transport="pybroker.contrib.kombu:Transport")``.

How AMQP's model maps onto pybroker (README, "Celery"):

- A **queue** ``Q`` is the topic ``kombu.Q`` read by the durable consumer
  group ``kombu-Q``, declared (GROUPS create, from new messages on) by
  ``queue_declare``: messages published after the declaration wait for a
  worker, across broker restarts. Characters a topic token may not hold
  (``.``, ``*``, ``>``, ``%``, blanks) are percent-encoded.
- **Exchanges and routing keys** are resolved by kombu's virtual exchange
  types (direct, topic) from the bindings this process declared; a direct
  exchange with no binding known here routes to the queue named by the
  routing key (Celery's default queue, and the reply queues of ``rpc://``,
  are bound that way). Fanout exchanges reach only the queues bound in this
  process (so Celery's broadcast remote control and events do not cross
  processes).
- **basic_ack** acks, **basic_reject(requeue=True)** naks (delivered again
  at once), **basic_reject(requeue=False)** publishes the message to the
  group's dead-letter topic (``dlq.kombu-Q``, with the broker's
  ``x-original-*`` headers and ``x-reason: rejected``) and then acks it;
  messages a closing channel still holds are nak'ed.
- **prefetch_count** (``basic_qos``, Celery's concurrency × prefetch
  multiplier) is the member's ``max_ack_pending`` when it starts consuming.
- The transport option **visibility_timeout** (seconds, default 3600, as
  kombu's Redis transport) is the group's ``ack_wait``: a message neither
  acked nor rejected within it goes to another worker. A worker that dies
  hands its messages back at once (its connection closes).
- **max_deliver** (transport option, default 0: unlimited, as AMQP): after
  that many deliveries the broker dead-letters the message.
- A task with a **countdown or eta** is kept by the broker until due
  (delayed delivery) rather than held by a worker; the transport option
  **delay_at_broker** (default True) set to False gives Celery's usual
  behaviour (the worker holds it, taking a prefetch slot), which is also
  what happens with a broker that keeps no delayed messages (its WELCOME
  has no max_delay_ms).
"""

from __future__ import annotations

import datetime
import json
import logging
import queue as _queue
import socket
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

from amqp.protocol import queue_declare_ok_t  # type: ignore[import-untyped]  # kombu depends on amqp
from kombu.transport import TRANSPORT_ALIASES, virtual
from kombu.transport.virtual.exchange import DirectExchange

from .. import BrokerError, ConnectionClosed, Reconnect, parse_urls
from .. import sync
from ..protocol import ErrorCode
from . import _names

__all__ = ["Channel", "QoS", "Transport", "group_name", "queue_topic"]

_log = logging.getLogger("pybroker.contrib.kombu")

#: The URL scheme this module registers with kombu.
SCHEME = "pybroker"
DEFAULT_PORT = 7420
#: A consumer's prefetch when kombu sets none (basic_qos 0: "unlimited").
DEFAULT_PREFETCH = 1000
#: Bound, in seconds, on one round trip to the broker (declare, publish, ack).
TIMEOUT = 30.0

def queue_topic(queue: str, prefix: str = "kombu") -> str:
    """The topic that holds kombu queue ``queue``'s messages."""
    return _names.queue_topic(queue, prefix)


def group_name(queue: str, prefix: str = "kombu") -> str:
    """The consumer group that is kombu queue ``queue``."""
    return _names.group_name(queue, prefix)


class QoS(virtual.QoS):
    """Settles at the broker what kombu acks and rejects."""

    channel: Channel

    def ack(self, delivery_tag: str) -> None:
        msg = self.channel._held.pop(delivery_tag, None)
        self.channel._held_queue.pop(delivery_tag, None)
        super().ack(delivery_tag)
        if msg is not None:
            # Queued for the client's loop thread, not waited for (as the
            # blocking client's own callbacks ack): the ACK frame goes out in
            # order with the rest; if the connection is lost first, the
            # broker delivers the message again (at least once).
            self.channel._client._soon(msg.raw.ack)

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        msg = self.channel._held.pop(delivery_tag, None)
        queue = self.channel._held_queue.pop(delivery_tag, "")
        self._quick_ack(delivery_tag)  # out of kombu's books either way
        if msg is None:
            return
        if requeue:
            msg.nak(timeout=TIMEOUT)
        else:
            self.channel._dead_letter(queue, msg)

    def restore_unacked(self) -> list[tuple[BaseException, Any]]:
        """Hand back what this channel holds: nak it, so that the group
        delivers it again (kombu's base class would publish a copy)."""
        self._flush()
        errors: list[tuple[BaseException, Any]] = []
        while self._delivered:
            tag, message = self._delivered.popitem()
            msg = self.channel._held.pop(tag, None)
            queue = self.channel._held_queue.pop(tag, None)
            if msg is None or queue not in self.channel._subs:
                # Unsubscribed (a closing channel cancels its consumers
                # first): the group took back everything unsettled then.
                continue
            try:
                msg.nak(timeout=TIMEOUT)
            except (ConnectionClosed, TimeoutError, BrokerError) as exc:
                # The connection is going: the broker hands it back anyway.
                _log.debug("nak of %s@%d on close failed: %s", msg.topic, msg.offset, exc)
        return errors


def _eta(message: Mapping[str, Any]) -> float | None:
    """A Celery task message's eta (its ``eta`` header, ISO 8601; a naive
    time is UTC, Celery's default), as seconds since the epoch; None
    without one, or one that does not parse (the worker then sees it)."""
    headers = message.get("headers")
    eta = headers.get("eta") if isinstance(headers, Mapping) else None
    if not isinstance(eta, str):
        return None
    try:
        when = datetime.datetime.fromisoformat(eta)
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    return when.timestamp()


class Channel(virtual.Channel):
    """One kombu channel over the transport's pybroker connection."""

    QoS = QoS
    connection: Transport

    #: Transport options read by the channel (``broker_transport_options``).
    from_transport_options = (  # type: ignore[assignment]  # kombu annotates its own two
        *virtual.Channel.from_transport_options,
        "topic_prefix",
        "visibility_timeout",
        "max_deliver",
        "confirm_publish",
        "delay_at_broker",
    )
    topic_prefix = "kombu"
    visibility_timeout: float = 3600.0
    max_deliver: int = 0
    #: True: a publish returns once the broker stored it (as Redis's LPUSH
    #: does); False: it is queued and sent in batches (faster, and lost if
    #: the publishing process dies before its client closes).
    confirm_publish = True
    #: True: a task with a countdown or eta is kept by the broker (delayed
    #: delivery) and reaches a worker when due; False: the worker gets it at
    #: once and holds it, unacknowledged, until due (what Celery does on
    #: brokers without delays; it takes a slot of the worker's prefetch).
    delay_at_broker = True

    def __init__(self, connection: Transport, **kwargs: Any) -> None:
        super().__init__(connection, **kwargs)
        #: Messages delivered to kombu and not yet settled, by delivery tag.
        self._held: dict[str, sync.Message] = {}
        #: The queue each held message came from (for its dead-letter topic).
        self._held_queue: dict[str, str] = {}
        #: One group subscription per consumed queue.
        self._subs: dict[str, sync.Subscription] = {}
        self._no_ack: set[str] = set()
        #: basic_get's subscriptions (prefetch 1), by queue.
        self._getters: dict[str, sync.Subscription] = {}

    @property
    def _client(self) -> sync.Client:
        return self.connection.pybroker

    def _topic(self, queue: str) -> str:
        return queue_topic(queue, self.topic_prefix)

    def _group(self, queue: str) -> str:
        return group_name(queue, self.topic_prefix)

    def _group_settings(self) -> dict[str, Any]:
        return {"ack_wait": float(self.visibility_timeout), "max_deliver": int(self.max_deliver)}

    # -- queues -----------------------------------------------------------

    def _new_queue(self, queue: str, **kwargs: Any) -> None:
        declared = self.connection._declared
        if queue in declared:
            return
        self._client.create_group(
            self._group(queue), self._topic(queue), start="new", timeout=TIMEOUT, **self._group_settings()
        )
        declared.add(queue)

    def queue_declare(self, queue: str | None = None, passive: bool = False, **kwargs: Any) -> Any:
        """Declare the queue (its group). Only a passive declare counts the
        messages waiting (two round trips): Celery declares its queues on
        every publish and never reads the count."""
        if passive:
            return super().queue_declare(queue, passive=True, **kwargs)
        name = queue or f"amq.gen-{uuid.uuid4()}"
        self._new_queue(name, **kwargs)
        return queue_declare_ok_t(name, 0, 0)

    def _has_queue(self, queue: str, **kwargs: Any) -> bool:
        try:
            self._client.groups("inspect", self._group(queue), timeout=TIMEOUT)
        except BrokerError as exc:
            if getattr(exc, "code", None) == ErrorCode.UNKNOWN_GROUP:
                return False
            raise
        return True

    def _size(self, queue: str) -> int:
        """Messages not yet settled: waiting in the topic past the group's
        cursor, plus those handed out or waiting to be handed out again."""
        try:
            summary = self._client.groups("inspect", self._group(queue), timeout=TIMEOUT)
        except BrokerError:
            return 0
        waiting = 0
        for info in self._client.topics(self._topic(queue), timeout=TIMEOUT):
            cursor = summary.get("topics", {}).get(info.topic, {}).get("cursor", info.first_offset)
            waiting += max(0, info.next_offset - max(int(cursor), info.first_offset))
        return waiting + int(summary.get("pending", 0))

    def _purge(self, queue: str) -> int:
        size = self._size(queue)
        try:
            self._client.purge_topic(self._topic(queue), timeout=TIMEOUT)
        except BrokerError as exc:
            if getattr(exc, "code", None) != ErrorCode.UNKNOWN_TOPIC:
                raise
        return size

    def _delete(self, queue: str, *args: Any, **kwargs: Any) -> None:
        self.connection._declared.discard(queue)
        try:
            self._client.groups("delete", self._group(queue), timeout=TIMEOUT)
        except BrokerError as exc:
            # A group that still has members (another worker) stays.
            _log.info("queue %r: group not deleted: %s", queue, exc)

    def _lookup(self, exchange: str, routing_key: str, default: str | None = None) -> list[str]:
        if not exchange:
            return [routing_key]
        found: list[str] = []
        if exchange in self.state.exchanges:
            found = list(self.typeof(exchange).lookup(self.get_table(exchange), exchange, routing_key, None))
        if not found and isinstance(self.typeof(exchange), DirectExchange) and routing_key:
            # Bound in another process: the routing key names the queue.
            self._new_queue(routing_key)
            found = [routing_key]
        return found

    # -- publishing -------------------------------------------------------

    def _put(self, queue: str, message: dict[str, Any], **kwargs: Any) -> None:
        payload = json.dumps(message).encode()
        due = _eta(message) if self.delay_at_broker and self._broker_delays() else None
        if due is not None and due > time.time():
            # Kept by the broker until due (protocol.md, "Delayed delivery");
            # always confirmed: the ack says it is kept.
            self._client.publish(self._topic(queue), payload, deliver_at=due, timeout=TIMEOUT)
            return
        if self.confirm_publish:
            self._client.publish(self._topic(queue), payload, timeout=TIMEOUT)
        else:
            self._client.send(self._topic(queue), payload, timeout=TIMEOUT)

    def _broker_delays(self) -> bool:
        """Whether the broker keeps delayed messages (its WELCOME names
        max_delay_ms): else a countdown or eta is
        left to the worker, as Celery does by default."""
        welcome = self._client.server
        return welcome is not None and "max_delay_ms" in welcome.limits

    # -- consuming --------------------------------------------------------

    def basic_consume(self, queue: str, no_ack: bool, callback: Any, consumer_tag: str, **kwargs: Any) -> Any:
        result = super().basic_consume(queue, no_ack, callback, consumer_tag, **kwargs)
        if no_ack:
            self._no_ack.add(queue)
        if queue not in self._subs:
            self._new_queue(queue)
            inbox = self.connection._inbox

            def hand_over(msg: sync.Message) -> None:
                inbox.put((self, queue, msg))

            self._subs[queue] = self._client.subscribe(
                self._topic(queue),
                hand_over,
                group=self._group(queue),
                auto_ack=False,
                max_ack_pending=self.qos.prefetch_count or DEFAULT_PREFETCH,
                timeout=TIMEOUT,
                **self._group_settings(),
            )
        return result

    def basic_cancel(self, consumer_tag: str) -> Any:
        queue = self._tag_to_queue.get(consumer_tag)
        result = super().basic_cancel(consumer_tag)
        if queue is not None and queue not in self._active_queues:
            self._stop_consuming(queue)
        return result

    def _stop_consuming(self, queue: str) -> None:
        self._no_ack.discard(queue)
        sub = self._subs.pop(queue, None)
        if sub is not None and not self._client.closed:
            try:
                sub.unsubscribe(timeout=TIMEOUT)
            except (ConnectionClosed, TimeoutError, BrokerError) as exc:
                _log.debug("unsubscribing from %r failed: %s", queue, exc)

    def _get(self, queue: str, timeout: float | None = None) -> dict[str, Any]:
        """basic_get: one message from a member with a prefetch of 1."""
        sub = self._getters.get(queue)
        if sub is None:
            self._new_queue(queue)
            sub = self._getters[queue] = self._client.subscribe(
                self._topic(queue),
                group=self._group(queue),
                max_ack_pending=1,
                timeout=TIMEOUT,
                **self._group_settings(),
            )
        try:
            # A short wait: the member has just asked, or the group is empty.
            msg = sub.get(timeout=0.1 if timeout is None else timeout)
        except TimeoutError:
            raise _queue.Empty() from None
        if msg is None:
            raise _queue.Empty()
        return self._accept(queue, msg)

    def _accept(self, queue: str, msg: sync.Message) -> dict[str, Any]:
        """The kombu message in ``msg``, held until kombu settles it."""
        raw: dict[str, Any] = json.loads(msg.payload)
        props = raw.setdefault("properties", {})
        if msg.deliveries > 1:
            raw["redelivered"] = True
            props.setdefault("delivery_info", {})["redelivered"] = True
        tag = props["delivery_tag"]
        self._held[tag] = msg
        self._held_queue[tag] = queue
        return raw

    def _deliver_one(self, queue: str, msg: sync.Message) -> None:
        if self.closed or queue not in self.connection._callbacks:
            # Handed over just before the consumer was cancelled: the
            # unsubscribe gave it back to the group; a member still
            # subscribed hands it back itself.
            if queue in self._subs:
                msg.nak(timeout=TIMEOUT)
            return
        raw = self._accept(queue, msg)
        if queue in self._no_ack:
            tag = raw["properties"]["delivery_tag"]
            self._held.pop(tag, None)
            self._held_queue.pop(tag, None)
            msg.ack(timeout=TIMEOUT)
        self.connection._deliver(raw, queue)

    def _dead_letter(self, queue: str, msg: sync.Message) -> None:
        """Rejected without requeue: to the dead-letter topic, then acked.
        Publish first: a crash in between dead-letters it twice rather than
        never."""
        group = self._group(queue)
        headers = dict(msg.headers)
        headers.update(
            {
                "x-original-topic": msg.topic,
                "x-original-offset": str(msg.offset),
                "x-group": group,
                "x-deliveries": str(msg.deliveries),
                "x-reason": "rejected",
            }
        )
        self._client.publish(f"dlq.{group}", msg.payload, headers, timeout=TIMEOUT)
        msg.ack(timeout=TIMEOUT)

    def close(self) -> None:
        if not self.closed:
            for queue in list(self._subs):
                self._stop_consuming(queue)
            for sub in self._getters.values():
                try:
                    sub.unsubscribe(timeout=TIMEOUT)
                except (ConnectionClosed, TimeoutError, BrokerError):
                    pass
            self._getters.clear()
        super().close()


def broker_url(conninfo: Any) -> str:
    """The pybroker URL of a kombu Connection: its host first, then the other
    brokers of a failover URL (``pybroker://h1:7420;pybroker://h2:7420``,
    kombu's syntax), so that the client moves to the next one by itself
    when the broker it is on goes away (a cluster node stopping), instead
    of retrying that one until kombu gives the connection up."""
    first = (conninfo.hostname or "127.0.0.1", conninfo.port or DEFAULT_PORT)
    addresses = [first]
    for alternate in conninfo.alt or ():
        try:
            for address in parse_urls(alternate):
                if address not in addresses:
                    addresses.append(address)
        except ValueError:
            continue  # not a pybroker URL: kombu's own failover has it
    return "pybroker://" + ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in addresses)


class Transport(virtual.Transport):
    """kombu's transport for ``pybroker://[user:password@]host[:port]``."""

    Channel = Channel
    default_port = DEFAULT_PORT  # type: ignore[assignment]  # kombu's base says None
    driver_type = "pybroker"
    driver_name = "pybroker"
    #: drain_events blocks on the messages the subscriptions hand over.
    polling_interval = None  # type: ignore[assignment]

    implements = virtual.Transport.implements.extend(
        asynchronous=False,
        exchange_type=frozenset(["direct", "topic"]),
        heartbeats=False,
    )

    connection_errors = (*virtual.Transport.connection_errors, ConnectionClosed, OSError)  # type: ignore[assignment]
    channel_errors = (*virtual.Transport.channel_errors, BrokerError)  # type: ignore[assignment]

    def __init__(self, client: Any, **kwargs: Any) -> None:
        super().__init__(client, **kwargs)
        #: (channel, queue, message) handed over by the subscriptions'
        #: threads, for drain_events (bounded by the members' prefetch).
        self._inbox: _queue.SimpleQueue[tuple[Channel, str, sync.Message]] = _queue.SimpleQueue()
        self._declared: set[str] = set()
        self._pybroker: sync.Client | None = None
        self._lock = threading.Lock()

    @property
    def pybroker(self) -> sync.Client:
        """This connection's blocking pybroker client (opened on first use)."""
        with self._lock:
            if self._pybroker is None or self._pybroker.closed:
                self._pybroker = self._connect()
            return self._pybroker

    def _connect(self) -> sync.Client:
        conninfo: Any = self.client  # the kombu Connection
        options = conninfo.transport_options
        return sync.connect(
            broker_url(conninfo),
            name=str(options.get("client_name", "kombu")),
            user=conninfo.userid or None,
            password=conninfo.password or None,
            connect_timeout=float(conninfo.connect_timeout or 10.0),
            # Lost connections are reopened and the groups rejoined; what
            # was in flight is delivered again (at least once).
            reconnect=Reconnect(max_attempts=options.get("reconnect_attempts", 60)),
        )

    def establish_connection(self) -> Any:
        self.pybroker  # noqa: B018  (connects now: a broker that is not there fails here)
        return super().establish_connection()

    def close_connection(self, connection: Any) -> None:
        super().close_connection(connection)
        with self._lock:
            client, self._pybroker = self._pybroker, None
        if client is not None:
            client.close()

    def drain_events(self, connection: Any, timeout: float | None = None, **kwargs: Any) -> None:
        """Deliver the next message any subscription handed over; socket.timeout
        if none comes within ``timeout`` seconds."""
        try:
            channel, queue, msg = self._inbox.get(timeout=timeout)
        except _queue.Empty:
            raise socket.timeout() from None
        channel._deliver_one(queue, msg)

    @property
    def default_connection_params(self) -> dict[str, Any]:
        return {"port": self.default_port, "hostname": "127.0.0.1"}


def _register(aliases: dict[str, str], names: Iterable[str] = (SCHEME,)) -> None:
    for name in names:
        aliases.setdefault(name, f"{__name__}:Transport")


_register(TRANSPORT_ALIASES)
