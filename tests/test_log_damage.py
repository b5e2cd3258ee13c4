"""Damage to the log on disk: the corruption matrix, and a broker that meets it.

For every kind of damage (a batch header, its length field, its payload,
junk between batches, a deleted segment file, deleted or damaged indexes)
in the oldest, a middle and the newest segment, what recovery and reads
promise (README, "Durability"):

- what is lost is at most the damaged batches, and every loss is reported
  (DataLoss / DATA_LOST / ``missing``), never skipped silently;
- no damaged byte is ever served: what is served is exactly what was
  written, at its offsets;
- later data keeps its offsets and new offsets are fresh;
- damaged bytes are set aside in ``quarantine/``, not destroyed.

The second half runs `pybroker serve` as users do and damages its files
while it is stopped and while it runs: subscribers, HTTP and the broker's
own liveness (health, idle CPU, SIGTERM) are checked against each kind.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from urllib.parse import quote

import pytest
import trio

import pybroker
from pybroker.server.storage.base import StoredBatch
from pybroker.protocol import (
    ERROR_FIELDS_OPTION,
    Deliver,
    Error,
    ErrorCode,
    StartKind,
    SubAck,
    Subscribe,
    decode_batch,
    encode_batch,
)

from helpers.http import get_json, request
from helpers.logs import batches_in, flip_byte, open_store, walk
from helpers.procs import BrokerProcess, broker_process
from helpers.raw import raw_client

SMALL = 1024
TIMEOUT = 20.0
#: What a damaged byte is XORed with.
FLIP = 0xA5


def build(data_dir: Path, topic: str = "t") -> tuple[list[StoredBatch], Path]:
    store = open_store(data_dir, segment_bytes=SMALL)
    log = store.topic(topic)
    written = []
    for i in range(60):
        count = 1 + i % 3
        batch = encode_batch([b"m%d.%d:" % (i, j) + b"x" * 40 for j in range(count)])
        base = log.append(batch, count, 1_000_000 + i)
        written.append(StoredBatch(base, count, 1_000_000 + i, batch))
    directory = log.directory
    assert len(log.segments) >= 6
    store.close()
    return written, directory


KINDS = ["header", "length", "payload", "junk", "delete-log", "delete-index", "damage-index", "no-index+payload"]


@pytest.mark.parametrize("where", ["oldest", "middle", "newest"])
@pytest.mark.parametrize("kind", KINDS)
def test_damage_costs_only_the_damaged_batches(tmp_path: Path, kind: str, where: str) -> None:
    written, directory = build(tmp_path)
    segments = sorted(directory.glob("*.log"))
    seg = {"oldest": segments[0], "middle": segments[len(segments) // 2], "newest": segments[-1]}[where]
    in_seg = batches_in(seg)
    assert len(in_seg) >= 2
    # A batch with one after it in its segment: damage at the very end of
    # the newest segment is a torn tail (test_log_file covers that rule).
    at = in_seg[len(in_seg) // 2 - 1] if len(in_seg) > 2 else in_seg[0]
    pos, victim_base, stored_len = at.pos, at.base, at.stored
    victim = next(b for b in written if b.base_offset == victim_base)
    seg_offsets = {o for h in in_seg for o in range(h.base, next(w for w in written if w.base_offset == h.base).next_offset)}
    original = seg.read_bytes()
    lost: set[int] = set()
    index = seg.with_suffix(".index")
    if kind == "header":
        flip_byte(seg, pos + 20, FLIP)  # the first timestamp: covered by the header CRC
        lost = set(range(victim.base_offset, victim.next_offset))
    elif kind == "length":
        flip_byte(seg, pos + 14, FLIP)
        lost = set(range(victim.base_offset, victim.next_offset))
    elif kind in ("payload", "no-index+payload"):
        flip_byte(seg, pos + stored_len - 3, FLIP)
        lost = set(range(victim.base_offset, victim.next_offset))
        if kind == "no-index+payload":
            index.unlink()
            seg.with_suffix(".timeindex").unlink()
    elif kind == "junk":
        with open(seg, "ab") as f:
            f.write(random.Random(3).randbytes(300))
    elif kind == "delete-log":
        seg.unlink()
        lost = seg_offsets
    elif kind == "delete-index":
        index.unlink()
    elif kind == "damage-index":
        data = bytearray(index.read_bytes())
        data[-3] ^= 0xFF
        index.write_bytes(bytes(data))
    else:
        raise AssertionError(kind)

    store = open_store(tmp_path, segment_bytes=SMALL)
    log = store.topic("t")
    served, losses = walk(log, 2048)
    # Served: exactly what was written, at its offsets, all but the lost ones.
    expected = [b for b in written if not set(range(b.base_offset, b.next_offset)) & lost]
    assert served == expected
    reported = {o for first, last, _ in losses for o in range(first, last + 1)}
    if kind == "delete-log" and where == "newest":
        # Its index shows how far it went: offsets up to there are never reused.
        assert reported and reported <= lost and min(reported) == min(lost)
        assert log.next_offset == max(reported) + 1
    else:
        assert reported == lost
        assert log.next_offset == written[-1].next_offset
    for _first, _last, reason in losses:
        assert reason == ("missing" if kind == "delete-log" else "damaged")
    # Payload damage in a segment whose index checks out is found by the
    # read (recovery does not read every old payload at start), marked, and
    # set aside at the next start.
    found_by_read = kind == "payload" and where != "newest"
    assert store.damaged_batches == int(found_by_read)
    # Damaged bytes were set aside, not destroyed.
    moved = sorted((tmp_path / "quarantine").rglob("*.bin"))
    if kind in ("header", "length", "payload", "no-index+payload") and not found_by_read:
        [found] = [f for f in store.findings if f.action == "quarantined"]
        assert (found.first_offset, found.last_offset) == (victim.base_offset, victim.next_offset - 1)
        [bin_file] = moved
        damaged = bin_file.read_bytes()
        assert len(damaged) == stored_len and damaged != original[pos : pos + stored_len]
    elif kind == "junk" and where != "newest":
        assert [len(p.read_bytes()) for p in moved] == [300]
    else:
        assert moved == []
    # New offsets are fresh, and a restart finds nothing more to do.
    next_offset = log.next_offset
    base = log.append(encode_batch([b"after"]), 1, 9_000_000)
    assert base == next_offset
    store.close()
    store = open_store(tmp_path, segment_bytes=SMALL)
    if found_by_read:
        [found] = store.findings
        assert (found.action, found.first_offset, found.last_offset) == (
            "quarantined", victim.base_offset, victim.next_offset - 1,
        )
    else:
        assert store.findings == []
    served2, losses2 = walk(store.topic("t"), 2048)
    assert served2 == served + [StoredBatch(base, 1, 9_000_000, encode_batch([b"after"]))]
    assert losses2 == losses
    store.close()


def test_damage_found_by_a_read_is_reported_and_skipped(tmp_path: Path) -> None:
    """Bytes that go bad while the broker runs: the read checks both CRCs,
    reports the batch lost, serves the rest, and never returns it later."""
    store = open_store(tmp_path, segment_bytes=SMALL)
    log = store.topic("t")
    written = []
    for i in range(40):
        batch = encode_batch([b"r%d" % i + b"y" * 30])
        written.append(StoredBatch(log.append(batch, 1, i), 1, i, batch))
    seg = log.segments[1]
    positions = batches_in(seg.path)
    # One batch's payload, the next batch's header.
    payload_base, payload_len = positions[1].base, positions[1].stored
    flip_byte(seg.path, positions[1].pos + payload_len - 2, FLIP)
    header_pos, header_base = positions[3].pos, positions[3].base
    flip_byte(seg.path, header_pos + 5, FLIP)
    served, losses = walk(log, 2048)
    assert losses == [(payload_base, payload_base, "damaged"), (header_base, header_base, "damaged")]
    assert served == [b for b in written if b.base_offset not in (payload_base, header_base)]
    assert store.damaged_batches == 2
    # Reading the same place again costs nothing more and says the same.
    assert walk(log, 2048) == (served, losses)
    assert store.damaged_batches == 2
    # Marked for the next start, which sets the damage aside for good.
    assert seg.damaged_path.exists()
    store.close()
    store = open_store(tmp_path, segment_bytes=SMALL)
    assert [(f.first_offset, f.last_offset) for f in store.findings] == [
        (payload_base, payload_base),
        (header_base, header_base),
    ]
    assert walk(store.topic("t"), 2048) == (served, losses)
    store.close()


# -- a broker meeting damage ------------------------------------------------------

TOPIC = "ledger"
N = 200


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def raw_replay(url: str) -> tuple[list[int], list[Error]]:
    """Replay TOPIC over a bare connection that asks for ERROR fields:
    offsets delivered and DATA_LOST errors, until the end of the topic."""
    offsets: list[int] = []
    errors: list[Error] = []
    with trio.fail_after(TIMEOUT):
        async with raw_client(url, timeout=TIMEOUT) as raw:
            await raw.handshake("raw", {ERROR_FIELDS_OPTION: "1"})
            await raw.send_event(Subscribe(1, TOPIC, StartKind.EARLIEST, 0, 0xFFFFFFFF))
            covered = 0
            while covered < N:
                event = await raw.next_event()
                if isinstance(event, Deliver):
                    n = len(decode_batch(event.batch))
                    offsets.extend(range(event.base_offset, event.base_offset + n))
                    covered += n
                elif isinstance(event, Error):
                    assert event.code == ErrorCode.DATA_LOST and not event.fatal, event
                    errors.append(event)
                    covered += int(event.fields["last"]) - int(event.fields["first"]) + 1
                else:
                    assert isinstance(event, SubAck), event
    return offsets, errors


async def check_alive(broker: BrokerProcess, http_port: int) -> None:
    assert broker.proc is not None
    health = await request(http_port, "GET", "/healthz")
    assert health.status == 200
    # Idle means idle: a read loop spinning on damage would burn a core.
    before = cpu_seconds(broker.proc.pid)
    await trio.sleep(1.0)
    assert cpu_seconds(broker.proc.pid) - before < 0.5


@pytest.mark.parametrize("kind", ["header", "payload", "length", "delete-log", "runtime-payload", "runtime-header"])
async def test_broker_serves_around_damage_and_stays_responsive(tmp_path: Path, kind: str) -> None:
    data_dir = tmp_path / "data"
    async with broker_process(data_dir, tmp_path, "--segment-bytes", "2048", "--http-port", "0") as broker:
        url = await broker.start()
        with trio.fail_after(TIMEOUT):
            async with pybroker.connect(url) as c:
                for i in range(N):
                    await c.publish(TOPIC, b"entry-%03d-" % i + b"z" * 30)
        if not kind.startswith("runtime"):
            assert await broker.stop() == 0
        segments = sorted((data_dir / "topics" / quote(TOPIC, safe="")).glob("*.log"))
        seg = segments[len(segments) // 2]
        at = batches_in(seg)[2]
        pos, victim, length = at.pos, at.base, at.stored
        lost = [victim]  # one message per batch here
        if kind in ("header", "runtime-header"):
            flip_byte(seg, pos + 3, FLIP)
        elif kind in ("payload", "runtime-payload"):
            flip_byte(seg, pos + length - 4, FLIP)
        elif kind == "length":
            flip_byte(seg, pos + 13, FLIP)
        else:
            lost = [h.base for h in batches_in(seg)]
            seg.unlink()
        if not kind.startswith("runtime"):
            url = await broker.start()
        http_port = next(r["http_port"] for r in broker.log_records() if r.get("event") == "listening")

        offsets, errors = await raw_replay(url)
        assert offsets == [o for o in range(N) if o not in lost]
        reason = "missing" if kind == "delete-log" else "damaged"
        assert [(e.fields["topic"], int(e.fields["first"]), int(e.fields["last"]), e.fields["reason"]) for e in errors] == [
            (TOPIC, lost[0], lost[-1], reason)
        ]
        # The client library counts it; HTTP lists it.
        with trio.fail_after(TIMEOUT):
            async with pybroker.connect(url) as c, c.subscribe(TOPIC, start="earliest") as sub:
                got = []
                async for msg in sub:
                    got.append(msg.offset)
                    if msg.offset == N - 1:
                        break
                assert got == offsets and sub.statistics().lost_messages == len(lost)
        fetched = await get_json(http_port, f"/v1/topics/{TOPIC}/messages?limit=1000")
        assert fetched["missing"] == [{"first": lost[0], "last": lost[-1], "reason": reason}]
        assert [m["offset"] for m in fetched["messages"]] == offsets
        await check_alive(broker, http_port)
        assert await broker.stop() == 0  # SIGTERM honoured
