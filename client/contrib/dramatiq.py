# Dramatiq's exception classes have untyped constructors: raising them is an
# untyped call by mypy --strict's rules.
# mypy: disable-error-code="no-untyped-call"
"""A Dramatiq broker on pybroker::

    import dramatiq
    from pybroker.contrib.dramatiq import PybrokerBroker

    dramatiq.set_broker(PybrokerBroker("pybroker://127.0.0.1:7420"))

How Dramatiq's model maps onto pybroker (README, "Dramatiq"):

- A **queue** ``Q`` is the topic ``dramatiq.Q`` read by the durable
  consumer group ``dramatiq-Q``, declared (GROUPS create, from new messages
  on) by ``declare_queue``; its **delay queue** ``Q.DQ`` is another topic
  and group (``dramatiq.Q%2EDQ``, ``dramatiq-Q%2EDQ``). A message sent with a
  delay (``send_with_options(delay=...)``, and every retry) goes to the
  delay queue with its ``eta``; the worker that takes it holds it until
  then, unacknowledged, and then enqueues it on ``Q`` and acks it (Dramatiq's
  own worker does this, as with RabbitMQ). The broker itself delays
  nothing.
- ``ack`` acks; ``nack`` (a message that failed for good) publishes it to
  the dead-letter topic ``dlq.dramatiq-Q`` (with the broker's
  ``x-original-*`` headers and ``x-reason: rejected``) and then acks it;
  ``requeue`` (a stopping worker's unstarted messages) naks, so they are
  delivered again at once. A worker that dies hands back everything it held
  at once: its connection closes.
- Dramatiq's ``prefetch`` is the member's ``max_ack_pending``.
- ``ack_wait`` (default 3600 s) is the queues' ack wait: a message neither
  acked nor nack'ed within it goes to another worker. The delay queues'
  (``delay_ack_wait``) must outlast the longest delay, since their messages
  stay unacknowledged until their eta: 8 days by default, past Retries'
  longest backoff (7 days).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterable
from typing import Any

import dramatiq
from dramatiq.broker import Consumer, MessageProxy
from dramatiq.common import current_millis, dq_name, q_name
from dramatiq.errors import ConnectionClosed as DramatiqConnectionClosed
from dramatiq.errors import QueueJoinTimeout, QueueNotFound
from dramatiq.message import Message

from .. import BrokerError, ConnectionClosed, Reconnect
from .. import sync
from ..protocol import ErrorCode
from . import _names

__all__ = ["PybrokerBroker", "group_name", "queue_topic"]

_log = logging.getLogger("pybroker.contrib.dramatiq")

#: Bound, in seconds, on one round trip to the broker.
TIMEOUT = 30.0
#: How often join() looks at the queues, in seconds.
JOIN_INTERVAL = 0.05


def queue_topic(queue: str, prefix: str = "dramatiq") -> str:
    """The topic that holds Dramatiq queue ``queue``'s messages."""
    return _names.queue_topic(queue, prefix)


def group_name(queue: str, prefix: str = "dramatiq") -> str:
    """The consumer group that is Dramatiq queue ``queue``."""
    return _names.group_name(queue, prefix)


class PybrokerBroker(dramatiq.Broker):
    """Dramatiq's broker on a pybroker at ``url``
    (``pybroker://[user:password@]host[:port]``).

    ``confirm_publish`` (default True): ``send()`` returns once the broker
    stored the message; False: messages are sent in batches, acknowledged
    by ``close()`` (and lost if the process dies first). ``max_deliver``
    (default 0, unlimited): after that many deliveries the broker
    dead-letters a message by itself. Other keywords go to
    :func:`pybroker.sync.connect` (``token=``, ``tls=``...).
    """

    def __init__(
        self,
        url: str = "pybroker://127.0.0.1:7420",
        *,
        middleware: list[dramatiq.Middleware] | None = None,
        prefix: str = "dramatiq",
        ack_wait: float = 3600.0,
        delay_ack_wait: float = 8 * 24 * 3600.0,
        max_deliver: int = 0,
        confirm_publish: bool = True,
        **connect_options: Any,
    ) -> None:
        super().__init__(middleware=middleware)
        self.url = url
        self.prefix = prefix
        self.ack_wait = ack_wait
        self.delay_ack_wait = delay_ack_wait
        self.max_deliver = max_deliver
        self.confirm_publish = confirm_publish
        connect_options.setdefault("name", "dramatiq")
        connect_options.setdefault("reconnect", Reconnect())
        self._connect_options = connect_options
        self._client: sync.Client | None = None
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self.queues: set[str] = set()
        self.delay_queues: set[str] = set()

    # -- the connection ------------------------------------------------------

    @property
    def client(self) -> sync.Client:
        """The broker's blocking pybroker client (opened on first use; one
        per process, shared by its threads)."""
        with self._lock:
            # A forked child (Dramatiq's worker processes, a pre-forking
            # web server) has the parent's client but not its thread.
            if self._client is None or self._client.closed or self._pid != os.getpid():
                self._client = sync.connect(self.url, **self._connect_options)
                self._pid = os.getpid()
            return self._client

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()

    def _topic(self, queue: str) -> str:
        return queue_topic(queue, self.prefix)

    def _group(self, queue: str) -> str:
        return group_name(queue, self.prefix)

    def _settings(self, queue: str) -> dict[str, Any]:
        wait = self.delay_ack_wait if queue in self.delay_queues else self.ack_wait
        return {"ack_wait": wait, "max_deliver": self.max_deliver}

    # -- queues ----------------------------------------------------------------

    def declare_queue(self, queue_name: str) -> None:
        """Declare ``queue_name`` and its delay queue (their groups)."""
        if queue_name in self.queues:
            return
        self.emit_before("declare_queue", queue_name)
        delayed = dq_name(queue_name)
        self.delay_queues.add(delayed)
        for name in (queue_name, delayed):
            self.client.create_group(
                self._group(name), self._topic(name), start="new", timeout=TIMEOUT, **self._settings(name)
            )
        self.queues.add(queue_name)
        self.emit_after("declare_queue", queue_name)
        self.emit_after("declare_delay_queue", delayed)

    def get_declared_queues(self) -> set[str]:
        return set(self.queues)

    def get_declared_delay_queues(self) -> set[str]:
        return set(self.delay_queues)

    def consume(self, queue_name: str, prefetch: int = 1, timeout: int = 30000) -> Consumer:
        if queue_name not in self.queues and queue_name not in self.delay_queues:
            raise QueueNotFound(queue_name)
        return _Consumer(self, queue_name, prefetch, timeout)

    def enqueue(self, message: Message[Any], *, delay: int | None = None) -> Message[Any]:
        queue_name = message.queue_name
        if delay is not None:
            queue_name = dq_name(queue_name)
            message = message.copy(queue_name=queue_name, options={"eta": current_millis() + delay})
        if queue_name not in self.queues and queue_name not in self.delay_queues:
            raise QueueNotFound(queue_name)
        self.emit_before("enqueue", message, delay)
        try:
            if self.confirm_publish:
                self.client.publish(self._topic(queue_name), message.encode(), timeout=TIMEOUT)
            else:
                self.client.send(self._topic(queue_name), message.encode(), timeout=TIMEOUT)
        except (ConnectionClosed, OSError) as exc:
            raise DramatiqConnectionClosed(exc) from exc
        self.emit_after("enqueue", message, delay)
        return message

    def _size(self, queue: str) -> int:
        """Messages of ``queue`` not settled yet: past the group's cursor,
        and handed out or waiting to be handed out again."""
        try:
            summary = self.client.groups("inspect", self._group(queue), timeout=TIMEOUT)
        except BrokerError as exc:
            if exc.code == ErrorCode.UNKNOWN_GROUP:
                return 0
            raise
        waiting = 0
        for info in self.client.topics(self._topic(queue), timeout=TIMEOUT):
            cursor = summary.get("topics", {}).get(info.topic, {}).get("cursor", info.first_offset)
            waiting += max(0, info.next_offset - max(int(cursor), info.first_offset))
        return waiting + int(summary.get("pending", 0))

    def flush(self, queue_name: str) -> None:
        """Drop the messages of ``queue_name`` not handed out yet."""
        try:
            self.client.purge_topic(self._topic(queue_name), timeout=TIMEOUT)
        except BrokerError as exc:
            if exc.code != ErrorCode.UNKNOWN_TOPIC:
                raise

    def flush_all(self) -> None:
        for name in (*self.queues, *self.delay_queues):
            self.flush(name)

    def join(self, queue_name: str, *, timeout: int | None = None) -> None:
        """Wait until ``queue_name`` and its delay queue have nothing left
        unsettled (for tests and scripts; it asks the broker every 50 ms).
        Raises QueueJoinTimeout after ``timeout`` milliseconds."""
        deadline = None if timeout is None else time.monotonic() + timeout / 1000
        while True:
            if self._size(queue_name) == 0 and self._size(dq_name(queue_name)) == 0:
                return
            if deadline is not None and time.monotonic() >= deadline:
                raise QueueJoinTimeout(queue_name)
            time.sleep(JOIN_INTERVAL)


class _Proxy(MessageProxy):
    """A delivered message, with the pybroker message it came in."""

    def __init__(self, message: Message[Any], raw: sync.Message) -> None:
        super().__init__(message)
        self._pybroker_message = raw


class _Consumer(Consumer):
    """One queue's group member (prefetch: its max_ack_pending)."""

    def __init__(self, broker: PybrokerBroker, queue_name: str, prefetch: int, timeout: int) -> None:
        self.broker = broker
        self.queue_name = queue_name
        self.timeout = timeout / 1000
        try:
            self.subscription = broker.client.subscribe(
                broker._topic(queue_name),
                group=broker._group(queue_name),
                max_ack_pending=max(1, prefetch),
                timeout=TIMEOUT,
                **broker._settings(queue_name),
            )
        except (ConnectionClosed, OSError) as exc:
            raise DramatiqConnectionClosed(exc) from exc

    def __next__(self) -> MessageProxy | None:
        try:
            raw = self.subscription.get(timeout=self.timeout)
        except TimeoutError:
            return None  # idle: Dramatiq's worker looks at its delayed messages
        except ConnectionClosed as exc:
            raise DramatiqConnectionClosed(exc) from exc
        if raw is None:
            raise DramatiqConnectionClosed(ConnectionClosed("the subscription ended"))
        try:
            message = Message.decode(raw.payload)
        except Exception:  # noqa: BLE001  (a message Dramatiq cannot read: dead-letter it)
            _log.exception("undecodable message %s@%d; dead-lettered", raw.topic, raw.offset)
            self._dead_letter(raw)
            return None
        return _Proxy(message, raw)

    def ack(self, message: MessageProxy) -> None:
        self._raw(message).ack(timeout=TIMEOUT)

    def nack(self, message: MessageProxy) -> None:
        self._dead_letter(self._raw(message))

    def requeue(self, messages: Iterable[MessageProxy]) -> None:
        for message in messages:
            try:
                self._raw(message).nak(timeout=TIMEOUT)
            except (ConnectionClosed, TimeoutError, BrokerError) as exc:
                # The connection is going: the broker hands it back anyway.
                _log.debug("requeue failed: %s", exc)

    def close(self) -> None:
        try:
            if not self.broker.client.closed:
                self.subscription.unsubscribe(timeout=TIMEOUT)
        except (ConnectionClosed, TimeoutError, BrokerError) as exc:
            _log.debug("unsubscribing from %r failed: %s", self.queue_name, exc)

    @staticmethod
    def _raw(message: MessageProxy) -> sync.Message:
        raw: sync.Message = message._pybroker_message
        return raw

    def _dead_letter(self, raw: sync.Message) -> None:
        """To the dead-letter topic, then acked (publish first: a crash in
        between dead-letters it twice rather than never)."""
        group = self.broker._group(q_name(self.queue_name))  # a delay queue's go with its queue's
        headers = dict(raw.headers)
        headers.update(
            {
                "x-original-topic": raw.topic,
                "x-original-offset": str(raw.offset),
                "x-group": group,
                "x-deliveries": str(raw.deliveries),
                "x-reason": "rejected",
            }
        )
        self.broker.client.publish(f"dlq.{group}", raw.payload, headers, timeout=TIMEOUT)
        raw.ack(timeout=TIMEOUT)
