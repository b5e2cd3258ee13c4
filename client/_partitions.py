"""Publishing to partitioned topics (protocol.md, "Partitioned topics").

A topic created with N partitions is N topics, ``orders~0`` to
``orders~N-1``; the broker refuses a publish to ``orders`` itself with
PARTITIONED and the count. The client learns counts from that refusal (or
from its own ``create_topic``) and from then on sends each message to its
partition itself: a message with a ``key`` header to partition
``crc32(key) mod N`` (the same in every client, so one key's messages stay
in order in one partition), one without to a partition that changes every
STICKY messages (so that keyless messages still make large batches).
"""

from __future__ import annotations

from collections.abc import Mapping

from .protocol import (
    KEY_HEADER,
    MSG_ID_HEADER,
    RECORD_HEADER,
    encode_record,
    partition_for,
    partition_topic,
    record_headers,
)

#: Keyless messages in a row that go to one partition.
STICKY = 128
#: Partitioned topics remembered (a publisher to more starts over: each
#: forgotten one costs one refused PUBLISH to learn again).
MAX_KNOWN = 4096


class Partitioner:
    """The partition counts known, and where each message goes."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self._turns: dict[str, int] = {}

    def learn(self, topic: str, partitions: int) -> None:
        if topic not in self.counts and len(self.counts) >= MAX_KNOWN:
            self.counts.clear()
            self._turns.clear()
        self.counts[topic] = partitions

    def route(self, topic: str, headers: Mapping[str, str] | None) -> str | None:
        """The partition (its topic's name) of a message to ``topic``, or
        None when ``topic`` is not known to be partitioned."""
        count = self.counts.get(topic)
        if not count:
            return None
        key = headers.get(KEY_HEADER) if headers else None
        if key is not None:
            return partition_topic(topic, partition_for(key, count))
        turn = self._turns.get(topic, 0)
        self._turns[topic] = turn + 1
        return partition_topic(topic, (turn // STICKY) % count)


def unbatched(record: bytes) -> tuple[bytes, dict[str, str]]:
    """A record taken out of a refused batch, to publish again on its own:
    its headers without the batch's msg-id (the batch it goes into gets its
    own), and the record to send."""
    headers = dict(record_headers(record))
    if MSG_ID_HEADER in headers:
        _, headers_len = RECORD_HEADER.unpack_from(record, 0)
        payload = record[RECORD_HEADER.size + headers_len :]
        del headers[MSG_ID_HEADER]
        record = encode_record(bytes(payload), headers)
    return record, headers
