"""A consumer group's saved state (broker/storage/groupstate.py) and its recovery
rules, without sockets.

Part 1: the journal format and the rules that rebuild a group from a
snapshot and the records after it. Part 2: a router over a real FileStore
and a GroupManager saving into the same data directory, as the server wires
them; ``crash()`` drops both the way kill -9 does (every write the broker
made survives, nothing else runs) and opens them again, so each recovery
rule is hit exactly, including the moments between recording a dead letter
and publishing it that a subprocess test cannot aim at.
"""

from __future__ import annotations

import errno
import itertools
import json
from pathlib import Path

import pytest

from pybroker.server.groups import GroupConfig, GroupManager
from pybroker.server.storage.groupstate import (
    SavedGroup,
    SavedPending,
    SavedTopic,
    encode_checkpoint,
    encode_dead_lettering,
    encode_delivered,
    encode_removed,
    encode_snapshot,
    find_dead_letters,
    journal_path,
    read_records,
    read_state_dir,
    replay,
)
from pybroker.server.storage import FileStore, MemoryTopicLog
from pybroker.server.router import Router, Subscription
from pybroker.protocol import AckKind, StartKind, decode_batch, encode_batch

from helpers.fakes import Delivery, FakeSession, GroupEvents
from helpers.faults import FaultyOps

TIMEOUT = 10.0


# ==========================================================================
# Part 1: the format and the rules


def _doc(topics: dict[str, object], name: str = "g") -> dict[str, object]:
    return {
        "version": 2,
        "name": name,
        "pattern": "jobs",
        "start": int(StartKind.EARLIEST),
        "start_value": 0,
        "config": {
            "ack_wait": 30.0,
            "max_deliver": 3,
            "backoff": [],
            "max_ack_pending": 10,
            "dead_letter": "dlq.g",
        },
        "topics": topics,
    }


def test_records_keep_the_longest_valid_prefix() -> None:
    records = [
        encode_checkpoint([_doc({})]),
        encode_delivered(b"g", b"jobs", 0, 5, 1),
        encode_dead_lettering(b"g", b"jobs", 3, 7),
    ]
    data = b"".join(records)
    got, valid = read_records(data)
    assert [k for k, _ in got] == [b"S", b"C", b"D", b"X"] and valid == len(data)
    # A torn tail (the record whose delivery was never released) is dropped.
    for cut in range(1, len(records[2])):
        got, valid = read_records(data[:-cut])
        assert [k for k, _ in got] == [b"S", b"C", b"D"] and valid == len(records[0]) + len(records[1])
    # So is everything from a damaged record on: its CRC no longer matches.
    damaged = bytearray(data)
    damaged[len(records[0]) + 12] ^= 0x01
    got, valid = read_records(bytes(damaged))
    assert [k for k, _ in got] == [b"S", b"C"] and valid == len(records[0])


def test_replay_applies_records_to_their_group() -> None:
    data = b"".join(
        [
            encode_checkpoint([_doc({"jobs": {"cursor": 1, "pending": [[0, 1]]}}), _doc({}, "h")]),
            encode_delivered(b"g", b"jobs", 0, 1, 2),
            encode_delivered(b"nobody", b"jobs", 0, 1, 9),  # a group removed before the checkpoint
            encode_removed(b"h"),
            encode_snapshot(_doc({}, "k")),  # created after the checkpoint
            encode_delivered(b"k", b"jobs", 4, 2, 1),
            encode_snapshot(_doc({"jobs": {"cursor": 1, "pending": []}})),  # g acked it all
        ]
    )
    problems: list[str] = []
    groups = replay(read_records(data)[0], problems)
    assert problems == [] and sorted(groups) == ["g", "k"]
    assert groups["g"].topics == {"jobs": SavedTopic(1, {})}
    assert groups["k"].topics == {"jobs": SavedTopic(6, {4: SavedPending(1), 5: SavedPending(1)})}
    # Without a whole checkpoint first, a journal describes nothing.
    for bad in (encode_snapshot(_doc({})), encode_delivered(b"g", b"jobs", 0, 1, 1) + encode_checkpoint([])):
        with pytest.raises(ValueError, match="checkpoint"):
            replay(read_records(bad)[0], problems)
    # A snapshot this broker cannot read costs only that group.
    newer = {**_doc({}, "n"), "version": 99}
    groups = replay(read_records(encode_checkpoint([newer, _doc({})]))[0], problems)
    assert sorted(groups) == ["g"] and len(problems) == 1 and "'n'" in problems[0]


def test_delivered_records_rebuild_counts_and_cursor() -> None:
    saved = SavedGroup.from_snapshot(
        _doc({"jobs": {"cursor": 10, "pending": [[3, 2], [5, 2]]}})
    )
    saved.delivered("jobs", 3, 1, 3)  # delivered again: the count rises
    saved.delivered("jobs", 5, 1, 1)  # never lowers a count
    saved.delivered("jobs", 4, 1, 2)  # below the cursor, not pending: settled before the snapshot
    saved.delivered("jobs", 10, 5, 1)  # handed out for the first time
    saved.delivered("other", 7, 2, 1)  # a topic the group began reading later
    assert saved.topics == {
        "jobs": SavedTopic(
            15, {3: SavedPending(3), 5: SavedPending(2), **{o: SavedPending(1) for o in range(10, 15)}}
        ),
        "other": SavedTopic(9, {7: SavedPending(1), 8: SavedPending(1)}),
    }
    saved.dead_lettering("jobs", 3, 42)
    saved.dead_lettering("jobs", 4, 43)  # not pending: nothing to look for
    assert saved.topics["jobs"].pending[3] == SavedPending(3, 42)
    assert 4 not in saved.topics["jobs"].pending


def test_snapshot_keeps_dead_letter_offsets() -> None:
    saved = SavedGroup.from_snapshot(_doc({"jobs": {"cursor": 4, "pending": [[1, 3, 9], [2, 1]]}}))
    assert saved.topics["jobs"].pending == {1: SavedPending(3, 9), 2: SavedPending(1)}


def test_newest_whole_checkpoint_wins(tmp_path: Path) -> None:
    old = journal_path(tmp_path, 3)
    old.write_bytes(
        encode_checkpoint([_doc({"jobs": {"cursor": 2, "pending": [[1, 1]]}})])
        + encode_delivered(b"g", b"jobs", 1, 1, 2)
        + b"\x00torn"
    )
    cut = journal_path(tmp_path, 5)  # a new generation cut short in its checkpoint
    cut.write_bytes(encode_checkpoint([_doc({}), _doc({}, "h")])[:-12])
    legacy = tmp_path / "g.json"  # what earlier versions wrote
    legacy.write_text(json.dumps(_doc({})))
    (tmp_path / "g.tmp").write_text("ignored")
    state = read_state_dir(tmp_path)
    assert state.generation == 5 and sorted(state.groups) == ["g"]
    assert state.groups["g"].topics["jobs"].pending == {1: SavedPending(2)}
    assert state.dropped_bytes == 5
    assert sorted(state.superseded) == sorted([old, cut, legacy])
    assert len(state.problems) == 1 and cut.name in state.problems[0]


def test_snapshots_of_earlier_versions_load_without_a_journal(tmp_path: Path) -> None:
    (tmp_path / "g.json").write_text(json.dumps({**_doc({"jobs": {"cursor": 3, "pending": [[2, 4]]}}), "version": 1}))
    (tmp_path / "h.json").write_text("{not json")
    state = read_state_dir(tmp_path)
    assert sorted(state.groups) == ["g"] and state.groups["g"].topics["jobs"].pending == {2: SavedPending(4)}
    assert state.superseded == [tmp_path / "g.json"]  # h.json is left for the operator
    assert len(state.problems) == 1 and "h.json" in state.problems[0]


def test_no_readable_journal_leaves_every_file(tmp_path: Path) -> None:
    journal_path(tmp_path, 1).write_bytes(encode_delivered(b"g", b"jobs", 0, 1, 1))
    state = read_state_dir(tmp_path)
    assert (state.groups, state.superseded, state.generation, len(state.problems)) == ({}, [], 1, 1)


def test_find_dead_letters_reads_only_this_groups_from_the_start() -> None:
    log = MemoryTopicLog("dlq.g", 1 << 20)

    def dead(group: str, topic: str, offset: object) -> tuple[bytes, dict[str, str]]:
        return b"x", {"x-group": group, "x-original-topic": topic, "x-original-offset": str(offset)}

    log.append(encode_batch([dead("g", "jobs", 1)]), 1, 1)  # offset 0: before the start
    log.append(encode_batch([dead("other", "jobs", 2), dead("g", "jobs", "bad")]), 2, 2)
    log.append(encode_batch([(b"plain", {}), dead("g", "jobs", 2), dead("g", "more", 2)]), 3, 3)
    wanted = {("jobs", 1), ("jobs", 2), ("more", 2), ("jobs", 9)}
    assert find_dead_letters(log, "g", wanted, 1) == {("jobs", 2), ("more", 2)}
    assert find_dead_letters(log, "g", wanted, 0) == {("jobs", 1), ("jobs", 2), ("more", 2)}
    assert find_dead_letters(log, "g", wanted, 6) == set()


# ==========================================================================
# Part 2: a manager over a FileStore, crashed and reopened


class Rig:
    """Router, FileStore and GroupManager on ``data``, wired as the server does."""

    def __init__(self, data: Path, *, sync: bool, ops: FaultyOps | None = None) -> None:
        self.data, self.sync = data, sync
        self.ops = ops or FaultyOps()  # the journal's file calls; the log's are real
        self.store = FileStore(data)
        events = GroupEvents()
        self.router = Router(self.store, events=events)
        self.router.recover()
        self.manager = events.manager = GroupManager(self.router, data / "groups", sync=sync, ops=self.ops)
        self.manager.load()
        self._ids = itertools.count(1)

    def crash(self) -> Rig:
        """What kill -9 leaves: the files as written; nothing saved on the way out."""
        for journal in [self.manager.state.journal, *self.manager.state._retired]:
            if journal is not None:
                journal.close()
        self.store.close()
        return Rig(self.data, sync=self.sync, ops=self.ops)

    def stop(self) -> None:
        self.manager.persist_now()
        self.store.close()

    def join(self, **options: str) -> tuple[FakeSession, Subscription]:
        session = FakeSession()
        sub = Subscription(session, next(self._ids), "jobs", credit=1 << 62)  # type: ignore[arg-type]
        config = GroupConfig.from_options("g", {"group": "g", "max_deliver": "3", **options})
        sub.member = self.manager.join(sub, "g", "jobs", config, StartKind.EARLIEST, 0)
        sub.group = self.manager.groups["g"]
        return session, sub

    async def publish(self, topic: str, payload: bytes) -> None:
        """Publish and make it durable (fsync always), so groups see it."""
        self.router.publish(self.router.topic(topic), encode_batch([(payload, {})]), 1, 1)
        await self.store.sync()
        self.router.release(self.router.held_seq)

    async def step(self) -> None:
        """A dispatch pass, and the writer's fsync round if it holds hand-outs."""
        self.manager.run_once()
        if self.sync:
            await self.manager.sync_round()

    def dead_letters(self) -> list[dict[str, str]]:
        topic = self.router.topics.get("dlq.g")
        if topic is None:
            return []
        return [dict(h) for b in topic.log.read(0, 1 << 20) for _, h in decode_batch(b.batch)]

    def pending(self) -> dict[int, int]:
        group = self.manager.groups["g"]
        (gt,) = group.topics.values()
        return {o: p.deliveries for o, p in gt.pending.items()}


def _one(session: FakeSession) -> Delivery:
    (got,) = session.got
    session.got.clear()
    return got


@pytest.mark.parametrize("sync", [True, False], ids=["fsync-always", "fsync-never"])
async def test_counts_survive_crashes_then_one_dead_letter(tmp_path: Path, sync: bool) -> None:
    """Delivered 1, 2, 3 times with a crash after each (no snapshot in
    between: only the journal's records know), then dead-lettered without a
    4th delivery, and a crash right after that does not do it again."""
    rig = Rig(tmp_path, sync=sync)
    await rig.publish("jobs", b"poison")
    for expected in (1, 2, 3):
        session, _ = rig.join()
        await rig.step()
        got = _one(session)
        assert (got.offsets, got.deliveries, rig.pending()) == ([0], expected, {0: expected})
        rig = rig.crash()
        assert rig.pending() == {0: expected}
    session, _ = rig.join()
    await rig.step()
    assert session.got == [] and rig.pending() == {}
    assert [(d["x-original-offset"], d["x-deliveries"]) for d in rig.dead_letters()] == [("0", "3")]
    rig = rig.crash()  # before any snapshot recorded the dead letter
    assert rig.pending() == {} and rig.manager.groups["g"].dead_lettered == 1
    session, _ = rig.join()
    await rig.publish("jobs", b"fine")
    await rig.step()
    assert [(d.offsets, d.payloads) for d in session.got] == [([1], [b"fine"])]
    assert len(rig.dead_letters()) == 1
    rig.stop()


async def test_crash_between_recording_and_publishing_a_dead_letter(tmp_path: Path) -> None:
    """The record that a dead letter may be published is durable before it is;
    if the crash came first, the restart finds no dead letter and publishes it."""
    rig = Rig(tmp_path, sync=True)
    await rig.publish("jobs", b"poison")
    session, sub = rig.join(max_deliver="1")
    await rig.step()
    assert _one(session).deliveries == 1
    rig.manager.settle(sub.group, sub.member, "jobs", AckKind.NAK, ((0, 0),), 0)  # type: ignore[arg-type]
    rig.manager.run_once()  # recorded; the publish waits for the fsync round
    assert rig.dead_letters() == []
    rig = rig.crash()
    assert rig.pending() == {0: 1} and rig.dead_letters() == []
    session, _ = rig.join()
    await rig.step()
    assert session.got == [] and rig.pending() == {}
    assert [d["x-original-offset"] for d in rig.dead_letters()] == ["0"]
    rig.stop()


async def test_late_ack_while_a_dead_letter_waits_settles_it(tmp_path: Path) -> None:
    rig = Rig(tmp_path, sync=True)
    await rig.publish("jobs", b"slow")
    session, sub = rig.join(max_deliver="1")
    await rig.step()
    _one(session)
    rig.manager.settle(sub.group, sub.member, "jobs", AckKind.NAK, ((0, 0),), 0)  # type: ignore[arg-type]
    rig.manager.run_once()
    # Done after all (a reconnecting client acks what it processed while away).
    rig.manager.settle(sub.group, sub.member, "jobs", AckKind.ACK, ((0, 0),), 0)  # type: ignore[arg-type]
    await rig.manager.sync_round()
    assert rig.pending() == {} and rig.dead_letters() == []
    rig.stop()


async def test_hand_outs_wait_for_the_fsync_that_counts_them(tmp_path: Path) -> None:
    rig = Rig(tmp_path, sync=True)
    await rig.publish("jobs", b"a")
    session, sub = rig.join()
    rig.manager.run_once()
    assert session.got == []  # counted in the journal, not yet fsynced
    (path,) = (tmp_path / "groups").iterdir()
    records, _ = read_records(path.read_bytes())
    assert [k for k, _ in records] == [b"C", b"S", b"D"]  # (no group at start), g created, handed out
    await rig.manager.sync_round()
    assert _one(session).offsets == [0]
    # A member that leaves before its hand-out is released never gets it;
    # the message waits for the next member, counted once more.
    await rig.publish("jobs", b"b")
    rig.manager.run_once()
    assert rig.pending() == {0: 1, 1: 1}
    session2, _ = rig.join()
    rig.manager.leave(sub.group, sub.member)  # type: ignore[arg-type]
    await rig.manager.sync_round()
    assert session.got == []
    await rig.step()
    assert sorted((d.offsets[0], d.deliveries) for d in session2.got) == [(0, 2), (1, 2)]
    rig.stop()


async def test_dead_letter_stays_in_the_snapshot_until_its_topic_made_it_durable(tmp_path: Path) -> None:
    """Under fsync always the dead letter is durable only after the log's next
    fsync; until then snapshots keep the message pending with the offset to
    look for it from, so no snapshot can drop it before the copy is safe."""
    rig = Rig(tmp_path, sync=False)
    await rig.publish("jobs", b"poison")
    session, sub = rig.join(max_deliver="1")
    await rig.step()
    rig.manager.settle(sub.group, sub.member, "jobs", AckKind.NAK, ((0, 0),), 0)  # type: ignore[arg-type]
    await rig.step()
    group = rig.manager.groups["g"]
    assert rig.pending() == {} and rig.router.topics["dlq.g"].visible_next == 0
    assert group.snapshot()["topics"]["jobs"]["pending"] == [[0, 1, 0]]
    await rig.store.sync()
    rig.router.release(rig.router.held_seq)
    assert group.snapshot()["topics"]["jobs"]["pending"] == []
    rig.stop()


async def test_snapshots_then_a_new_generation_then_a_torn_tail(tmp_path: Path) -> None:
    rig = Rig(tmp_path, sync=True)
    for i in range(5):
        await rig.publish("jobs", b"%d" % i)
    session, sub = rig.join()
    await rig.step()
    rig.manager.settle(sub.group, sub.member, "jobs", AckKind.ACK, ((0, 1),), 0)  # type: ignore[arg-type]
    rig.manager.snapshot_changed()
    (first,) = (tmp_path / "groups").iterdir()
    # Checkpoint, g created, a hand-out per stored batch, g with its acks.
    assert [k for k, _ in read_records(first.read_bytes())[0]] == [b"C", b"S", *[b"D"] * 5, b"S"]
    rig.manager.snapshot_changed()  # nothing changed since: nothing written
    assert len(read_records(first.read_bytes())[0]) == 8
    # Grown past its limit, the journal starts over with a checkpoint; the
    # old file goes once the new one is durable.
    rig.manager.state.ROTATE_MIN_BYTES = 0
    rig.manager.settle(sub.group, sub.member, "jobs", AckKind.ACK, ((2, 2),), 0)  # type: ignore[arg-type]
    rig.manager.snapshot_changed()
    assert sorted(p.name for p in (tmp_path / "groups").iterdir()) == ["journal.1", "journal.2"]
    await rig.manager.sync_round()
    (second,) = (tmp_path / "groups").iterdir()
    assert second.name == "journal.2"
    assert [k for k, _ in read_records(second.read_bytes())[0]] == [b"S", b"C"]
    with open(second, "ab") as f:
        f.write(encode_delivered(b"g", b"jobs", 3, 1, 2)[:-1])  # torn: never released
    rig = rig.crash()
    assert rig.pending() == {3: 1, 4: 1}
    assert rig.manager.groups["g"].topics[rig.router.topics["jobs"]].cursor == 5
    assert [p.name for p in (tmp_path / "groups").iterdir()] == ["journal.3"]
    rig.stop()


async def test_deleted_group_stays_deleted_after_a_crash(tmp_path: Path) -> None:
    rig = Rig(tmp_path, sync=False)
    session, sub = rig.join()
    rig.manager.leave(sub.group, sub.member)  # type: ignore[arg-type]
    rig.manager.delete("g")
    rig = rig.crash()
    assert rig.manager.groups == {}
    session, sub = rig.join(max_deliver="7")  # the name is free for a new group
    rig = rig.crash()
    assert rig.manager.groups["g"].config.max_deliver == 7
    rig.stop()


# -- a disk that fills up or fails ------------------------------------------


@pytest.mark.parametrize("sync", [True, False], ids=["fsync-always", "fsync-never"])
async def test_full_disk_holds_group_deliveries_until_a_checkpoint_fits(tmp_path: Path, sync: bool) -> None:
    """A count that cannot be written is not sent: the group's deliveries
    wait (acks and dispatch go on in memory), the broker keeps running, and
    once there is room a checkpoint of everything lets them go."""
    rig = Rig(tmp_path, sync=sync)
    await rig.publish("jobs", b"a")
    session, sub = rig.join()
    await rig.step()
    assert _one(session).offsets == [0]
    rig.ops.fill()
    await rig.publish("jobs", b"b")  # (the log's own calls are not the faulty ones)
    await rig.step()
    assert rig.manager.broken and session.got == []
    rig.manager.settle(sub.group, sub.member, "jobs", AckKind.ACK, ((0, 0),), 0)  # type: ignore[arg-type]
    rig.manager.snapshot_changed()  # the writer's retry: still full
    await rig.manager.sync_round()
    assert rig.manager.broken and session.got == []
    # Meanwhile nothing more is handed out (it could not be sent).
    session2, _ = rig.join()
    await rig.publish("jobs", b"c")
    await rig.step()
    assert rig.manager.groups["g"].delivered == 2 and session2.got == []
    rig.ops.free()
    rig.manager.snapshot_changed()
    await rig.manager.sync_round()
    assert not rig.manager.broken
    assert [(d.offsets, d.deliveries) for d in session.got] == [([1], 1)]
    await rig.step()  # and the rest goes out
    assert sorted((d.offsets, d.deliveries) for d in session.got + session2.got) == [([1], 1), ([2], 1)]
    # Exactly one journal file is left, and it holds the ack made meanwhile.
    assert [p.name for p in (tmp_path / "groups").iterdir()] == [rig.manager.state.journal.path.name]  # type: ignore[union-attr]
    rig = rig.crash()
    assert rig.pending() == {1: 1, 2: 1}
    rig.stop()


async def test_failed_fsync_is_not_trusted_a_new_generation_is(tmp_path: Path) -> None:
    rig = Rig(tmp_path, sync=True)
    await rig.publish("jobs", b"a")
    session, _ = rig.join()
    rig.manager.run_once()
    first = rig.manager.state.journal
    assert first is not None
    rig.ops.fail_next("fdatasync", errno.EIO)
    await rig.manager.sync_round()
    assert rig.manager.broken and session.got == []  # never released on a failed fsync
    rig.manager.snapshot_changed()
    assert rig.manager.state.journal is not None and rig.manager.state.journal is not first
    await rig.manager.sync_round()
    assert _one(session).offsets == [0]
    assert not first.path.exists()  # replaced, then deleted once the new one was durable
    rig = rig.crash()
    assert rig.pending() == {0: 1}
    rig.stop()


async def test_torn_journal_write_ends_that_file(tmp_path: Path) -> None:
    """A short write leaves a torn record: nothing is appended after it (a
    reader would stop there); the next generation carries everything."""
    rig = Rig(tmp_path, sync=False)
    await rig.publish("jobs", b"a")
    session, _ = rig.join()
    rig.ops.short_next("write")
    await rig.step()
    assert rig.manager.broken and session.got == []
    rig.ops.free()
    rig.manager.snapshot_changed()
    await rig.manager.sync_round()
    assert _one(session).deliveries == 1
    rig = rig.crash()
    assert rig.pending() == {0: 1}
    rig.stop()
