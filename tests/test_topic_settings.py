"""Changing a topic's retention and segment size while the broker runs
(protocol.md, "TOPICS" set): applied at once, saved in the data directory
for restarts, refused clearly for what cannot change so."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import pybroker
from pybroker.protocol import ErrorCode
from pybroker.server.storage.settings import SettingsResolver, TopicSettings
from pybroker.server.testing import running_broker

from helpers.http import assert_error, request
from helpers.procs import run, serve

SMALL = SettingsResolver.from_specs(TopicSettings(fsync="always", segment_bytes=1024), [])


async def test_retention_set_at_run_time_applies_and_survives_a_restart(tmp_path: Path) -> None:
    async with running_broker(data_dir=tmp_path, topic_settings=SMALL) as server:
        async with pybroker.connect(server.url) as c:
            for i in range(40):
                await c.publish("r.t", b"%02d " % i + b"." * 200)
            store = server.broker.store
            assert store.enforce_retention() == 0  # no limit yet
            answer = await c.set_topic("r.t", retention_bytes=2048)
            assert answer["topic"] == "r.t" and answer["settings"]["retention_bytes"] == 2048
            assert answer["settings"]["segment_bytes"] == 1024  # the rest as they were
            assert store.enforce_retention() > 0
            (info,) = await c.topics("r.t")
            assert info.first_offset > 0 and info.retained_bytes <= 2048 + 1024
            await c.set_topic("r.t", retention_seconds="7d")
    saved = json.loads((tmp_path / "topic-settings.json").read_text())
    assert saved == {"r.t": {"retention_bytes": 2048, "retention_seconds": 604800.0}}
    async with running_broker(data_dir=tmp_path, topic_settings=SMALL) as server:
        settings = server.broker.store.topic("r.t").settings
        assert (settings.retention_bytes, settings.retention_seconds) == (2048, 604800.0)
        async with pybroker.connect(server.url) as c:
            lifted = await c.set_topic("r.t", retention_bytes=None)
            assert lifted["settings"]["retention_bytes"] is None
            # Deleting the topic forgets its settings: the name starts afresh.
            await c.delete_topic("r.t")
            await c.publish("r.t", b"new")
            assert server.broker.store.topic("r.t").settings.retention_seconds is None
    assert json.loads((tmp_path / "topic-settings.json").read_text()) == {}


@pytest.mark.parametrize(
    ("changes", "complaint"),
    [
        ({"fsync": "never"}, "fixed while the broker runs"),
        ({"colour": "blue"}, "cannot be set at run time"),
        ({"retention_seconds": "soon"}, "not a usable value"),
        ({"retention_bytes": "-5"}, "not a usable value"),
        ({"segment_bytes": "100"}, "segment_bytes must be at least 1024"),
    ],
)
async def test_what_cannot_be_set_is_refused(tmp_path: Path, changes: dict[str, str], complaint: str) -> None:
    async with running_broker(data_dir=tmp_path) as server:
        async with pybroker.connect(server.url) as c:
            await c.publish("s.t", b"x")
            with pytest.raises(pybroker.BrokerError) as refused:
                await c.set_topic("s.t", **changes)
            assert refused.value.code == ErrorCode.BAD_REQUEST and complaint in str(refused.value)
            with pytest.raises(pybroker.BrokerError) as missing:
                await c.set_topic("s.none", retention_bytes=1)
            assert missing.value.code == ErrorCode.UNKNOWN_TOPIC
    assert not (tmp_path / "topic-settings.json").exists()


async def test_the_memory_store_has_no_topic_settings() -> None:
    async with running_broker(storage="memory") as server:
        async with pybroker.connect(server.url) as c:
            await c.publish("m.t", b"x")
            with pytest.raises(pybroker.BrokerError, match="memory store"):
                await c.set_topic("m.t", retention_bytes=4096)


async def test_set_over_http_and_the_cli(tmp_path: Path) -> None:
    async with serve(tmp_path) as broker:
        async with pybroker.connect(broker.url) as c:
            await c.publish("cli.s", b"x")
        result = await run(["topics", "set", "cli.s", "retention=12h", "--url", broker.url])
        assert result.returncode == 0, result.stderr.decode()
        assert "retention_seconds=43200.0" in result.stdout.decode()
        bare = await run(["topics", "set", "cli.s", "--url", broker.url])
        assert bare.returncode == 2
    async with running_broker(data_dir=tmp_path / "in-process") as server:
        async with pybroker.connect(server.url) as c:
            await c.publish("h.s", b"x")
        assert server.http_port is not None
        headers = {"content-type": "application/json"}
        ok = await request(server.http_port, "PATCH", "/v1/topics/h.s", '{"retention_bytes": 1048576}', headers)
        assert ok.status == 200 and ok.json()["settings"]["retention_bytes"] == 1048576
        assert_error(await request(server.http_port, "PATCH", "/v1/topics/h.s", '{"fsync": "never"}', headers), 400)
        assert_error(await request(server.http_port, "PATCH", "/v1/topics/h.s", "[]", headers), 422)
        assert_error(
            await request(server.http_port, "PATCH", "/v1/topics/nope", '{"retention_bytes": 1}', headers),
            404, "topic_not_found",
        )
