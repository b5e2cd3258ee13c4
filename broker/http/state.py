"""What the HTTP side reads of the broker's state: topics, subscriptions, lag.

Shared by the JSON API and /metrics so both report the same figures.
Lag is counted in messages: the topic's visible end (appended and, for
fsync ``always`` topics, durable) minus the next offset the subscription
will be handed. A caught-up TCP subscription has lag 0 (what sits in its
connection's outbound queue is not counted).
"""

from __future__ import annotations

import datetime as _dt
from typing import TYPE_CHECKING, Any

import attrs

from ..router import Subscription, Topic

if TYPE_CHECKING:
    from .server import HttpServer


@attrs.frozen
class SubscriptionView:
    transport: str  #: "tcp" or "sse"
    connection: int
    client: str
    peer: str
    sub_id: int
    pattern: str
    position: int  #: the next offset it will be handed
    lag: int

    def json(self) -> dict[str, Any]:
        return attrs.asdict(self)


def subscription_view(sub: Subscription, topic: Topic) -> SubscriptionView:
    who = sub.subscriber.describe()
    position = sub.subscriber.position(sub, topic)
    return SubscriptionView(
        transport=who.transport,
        connection=who.connection,
        client=who.client,
        peer=who.peer,
        sub_id=sub.sub_id,
        pattern=sub.pattern,
        position=position,
        lag=max(0, topic.visible_next - position),
    )


def subscriptions(topic: Topic) -> list[SubscriptionView]:
    return [subscription_view(sub, topic) for sub in topic.subs]


def _iso(timestamp_us: int) -> str | None:
    if not timestamp_us:
        return None
    return _dt.datetime.fromtimestamp(timestamp_us / 1_000_000, tz=_dt.timezone.utc).isoformat()


def topic_summary(http: HttpServer, topic: Topic) -> dict[str, Any]:
    log = topic.log
    first = log.first_offset
    nxt = log.next_offset
    rate_in, rate_out = http.rates.rates(topic)
    views = subscriptions(topic)
    return {
        "name": topic.name,
        "first_offset": first,
        "last_offset": nxt - 1 if nxt > first else None,
        "next_offset": nxt,
        "messages": nxt - first,
        "bytes": log.size_bytes,
        "messages_in": topic.messages_in,
        "bytes_in": topic.bytes_in,
        "messages_out": topic.messages_out,
        "bytes_out": topic.bytes_out,
        "message_rate": round(rate_in, 3),
        "message_rate_out": round(rate_out, 3),
        "subscriptions": len(views),
        "consumer_groups": len(topic.groups),
        "max_lag": max((v.lag for v in views), default=0),
        "durability": log.durability.name.lower(),
        "last_timestamp": _iso(topic.last_timestamp),
    }


def connections(http: HttpServer, limit: int = 200) -> list[dict[str, Any]]:
    out = []
    for session in sorted(http.listener.sessions, key=lambda s: s.conn_id)[:limit]:
        out.append(
            {
                "connection": session.conn_id,
                "peer": session.peer,
                "client": session.client_name,
                "subscriptions": len(session.subs),
                "messages_in": session.messages_in,
                "bytes_out": session.bytes_out,
            }
        )
    return out
