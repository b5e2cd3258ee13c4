"""The topic registry (docs/cluster.md §2, §3).

``topics/{topic}`` = ``{"partitions": N, "settings": {...}}``, created by
any node only if absent (a transaction comparing ``create_revision == 0``).
The partition count is fixed for the topic's life, because changing it
would move keys between partitions; the settings (retention) may change
while the cluster runs (``set_settings``: TOPICS set on any node), compared
on the key's mod revision so that two changes at once both apply. A message with a
key goes to partition ``zlib.crc32(key) % N``. Every node reads and watches
the registry (a ``PrefixMirror``).
"""

from __future__ import annotations

import json
from typing import Any

import attrs

from pybroker.protocol import partition_for

from .etcd import Compare, Etcd, Get, KeyValue, Put
from .keys import ClusterKeys
from .mirror import PrefixMirror

#: Bounds: partitions of one topic, topics in the registry, bytes of settings.
#: Tries of a settings change that another one keeps overtaking.
SET_ATTEMPTS = 16
MAX_PARTITIONS = 4096
MAX_TOPICS = 10_000
MAX_SETTINGS_BYTES = 16 * 1024


class TopicError(Exception):
    """A topic could not be created or read as asked."""


class PartitionCountMismatch(TopicError):
    """The topic exists with another partition count (it cannot change)."""

    def __init__(self, topic: str, existing: int, asked: int) -> None:
        super().__init__(
            f"topic {topic!r} exists with {existing} partitions, not {asked}: "
            "a topic's partition count cannot change (it would move keys)"
        )
        self.topic = topic
        self.existing = existing
        self.asked = asked


@attrs.frozen
class TopicInfo:
    name: str
    partitions: int
    settings: dict[str, Any] = attrs.field(factory=dict, eq=False)
    #: The revision that created the topic's key (0 before it exists).
    created: int = 0
    #: The first offset a purge kept (TOPICS purge, purge.py): every node
    #: drops what its copy holds below it. 0: never purged. Partition 0's;
    #: ``floors`` has the others' (a partitioned topic's partitions are
    #: purged one by one).
    floor: int = 0
    #: Set on the record ``create`` returns when that call made it.
    new: bool = attrs.field(default=False, eq=False)
    floors: dict[int, int] = attrs.field(factory=dict, eq=False)

    def floor_of(self, partition: int) -> int:
        return self.floor if partition == 0 else self.floors.get(partition, 0)

    def with_floor(self, partition: int, floor: int) -> TopicInfo:
        if partition == 0:
            return attrs.evolve(self, floor=floor, new=False)
        return attrs.evolve(self, floors={**self.floors, partition: floor}, new=False)

    def encode(self) -> bytes:
        record: dict[str, Any] = {"partitions": self.partitions, "settings": self.settings}
        if self.floor:
            record["floor"] = self.floor
        if self.floors:
            record["floors"] = {str(p): f for p, f in sorted(self.floors.items())}
        return json.dumps(record, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, name: str, kv: KeyValue) -> TopicInfo:
        """ValueError when the value is not a topic record within bounds."""
        try:
            raw = json.loads(kv.value)
        except ValueError as exc:
            raise ValueError(f"topic {name!r}: its record is not JSON: {kv.value!r:.200}") from exc
        if not isinstance(raw, dict):
            raise ValueError(f"topic {name!r}: its record is not an object: {kv.value!r:.200}")
        partitions, settings = raw.get("partitions"), raw.get("settings", {})
        if not isinstance(partitions, int) or isinstance(partitions, bool) or not 1 <= partitions <= MAX_PARTITIONS:
            raise ValueError(f"topic {name!r}: partitions must be 1..{MAX_PARTITIONS}, not {partitions!r:.50}")
        if not isinstance(settings, dict):
            raise ValueError(f"topic {name!r}: settings must be an object")
        floor = raw.get("floor", 0)
        if not _offset(floor):
            raise ValueError(f"topic {name!r}: floor must be an offset, not {floor!r:.50}")
        floors = raw.get("floors", {})
        if not isinstance(floors, dict) or not all(
            isinstance(p, str) and p.isdigit() and 0 < int(p) < partitions and _offset(f) for p, f in floors.items()
        ):
            raise ValueError(f"topic {name!r}: floors must map partitions to offsets, not {floors!r:.50}")
        return cls(
            name, partitions, settings, kv.create_revision, floor, floors={int(p): f for p, f in floors.items()}
        )

    def partition_for(self, key: bytes) -> int:
        return partition_for(key, self.partitions)


def _offset(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class TopicRegistry:
    """Creates topics and keeps every topic's record current (``run``)."""

    def __init__(self, etcd: Etcd, *, keys: ClusterKeys | None = None, max_topics: int = MAX_TOPICS) -> None:
        self.etcd = etcd
        self.keys = keys or ClusterKeys()
        self.mirror = PrefixMirror(etcd, self.keys.topics_prefix, max_keys=max_topics, name="topics")

    async def create(self, name: str, partitions: int = 1, settings: dict[str, Any] | None = None) -> TopicInfo:
        """Create the topic if absent; its record. If it exists with the
        same partition count, the existing record (its settings as they
        are); with another count, PartitionCountMismatch."""
        if not name:
            raise TopicError("a topic needs a name")
        if not 1 <= partitions <= MAX_PARTITIONS:
            raise TopicError(f"partitions must be 1..{MAX_PARTITIONS}, not {partitions}")
        info = TopicInfo(name, partitions, dict(settings or {}))
        value = info.encode()
        if len(value) > MAX_SETTINGS_BYTES:
            raise TopicError(f"topic {name!r}: settings over {MAX_SETTINGS_BYTES} bytes")
        key = self.keys.topic(name)
        result = await self.etcd.txn([Compare.create_revision(key, "==", 0)], [Put(key, value)], [Get(key)])
        if result.succeeded:
            return attrs.evolve(info, created=result.revision, new=True)
        found = result.responses[0] if result.responses else None
        if not isinstance(found, list) or not found:  # deleted between compare and read: cannot happen in one txn
            raise TopicError(f"topic {name!r}: etcd refused its creation and holds no record")
        existing = self._decode(name, found[0])
        if existing.partitions != partitions:
            raise PartitionCountMismatch(name, existing.partitions, partitions)
        return existing

    async def set_settings(self, name: str, changes: dict[str, Any]) -> TopicInfo:
        """Merge ``changes`` into the topic's settings in etcd (a value of
        None lifts a limit; it is kept as null); the new record. KeyError if
        the topic has no record, TopicError over the size bound or when
        other changes keep overtaking this one."""
        key = self.keys.topic(name)
        for _ in range(SET_ATTEMPTS):
            kv = await self.etcd.get(key)
            if kv is None:
                raise KeyError(name)
            found = self._decode(name, kv)
            info = attrs.evolve(found, settings={**found.settings, **changes})
            value = info.encode()
            if len(value) > MAX_SETTINGS_BYTES:
                raise TopicError(f"topic {name!r}: settings over {MAX_SETTINGS_BYTES} bytes")
            result = await self.etcd.txn([Compare.mod_revision(key, "==", kv.mod_revision)], [Put(key, value)])
            if result.succeeded:
                return info
        raise TopicError(f"topic {name!r}: its settings kept changing under this change; try again")

    def info(self, name: str) -> TopicInfo | None:
        """The topic's record as the mirror has it (None if none, or if it
        does not decode)."""
        kv = self.mirror.kvs.get(self.keys.topic(name))
        if kv is None:
            return None
        try:
            return TopicInfo.decode(name, kv)
        except ValueError:
            return None

    async def get(self, name: str) -> TopicInfo | None:
        """The topic's record read from etcd now (None if there is none)."""
        kv = await self.etcd.get(self.keys.topic(name))
        return self._decode(name, kv) if kv is not None else None

    def _decode(self, name: str, kv: KeyValue) -> TopicInfo:
        try:
            return TopicInfo.decode(name, kv)
        except ValueError as exc:
            raise TopicError(str(exc)) from None

    async def run(self) -> None:
        await self.mirror.run()

    @property
    def topics(self) -> dict[str, TopicInfo]:
        """Every topic with a valid record, as of ``mirror.revision``
        (records that do not decode are left out)."""
        out: dict[str, TopicInfo] = {}
        for key, kv in self.mirror.kvs.items():
            try:
                name = self.keys.name_of(self.keys.topics_prefix, key)
                out[name] = TopicInfo.decode(name, kv)
            except ValueError:
                continue
        return out

    async def changed(self) -> None:
        await self.mirror.changed()
