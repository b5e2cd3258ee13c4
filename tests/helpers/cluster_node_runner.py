"""One cluster node as a process, for the multi-process ownership test.

    python cluster_node_runner.py --etcd URL --s3 URL --bucket B
        --object-prefix P --key-prefix K --node NAME --topic T
        --partitions N --history FILE [--ttl S]

It runs a ClusterNode (membership, topic registry, ownership manager under
a member lease; a new lease and a fresh start when the lease is lost) and,
for every partition it holds, appends batches one after another, writing
one JSON line per event to FILE, flushed as it is written so that a
SIGKILL loses nothing written: ``{"e": "invoke"|"ok"|"unknown"|"refused",
"p", "tag", "offset", "lease", "wall"}``; the batch's records are
``{tag}#0``, ``{tag}#1``. It prints ``{"ready": NODE}`` once started.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Python puts this script's directory first on the path, where helpers/http.py
# would shadow the standard library's http; the tests directory goes there instead.
sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import trio  # noqa: E402

from helpers.cluster_nodes import ClusterConfig, ClusterNode, batch_of  # noqa: E402
from pybroker.server.cluster.keys import ClusterKeys  # noqa: E402
from pybroker.server.cluster.outcomes import AppendError, NotOwner, OutcomeUnknown  # noqa: E402


async def append_loop(node: ClusterNode, topic: str, partition: int, history: object) -> None:
    seq = 0
    while True:
        manager, keeper = node.manager, node.keeper
        owner = manager.local(topic, partition) if manager is not None else None
        if manager is None or keeper is None or owner is None:
            with trio.move_on_after(0.2):
                if manager is not None:
                    await manager.changed()
            continue
        seq += 1
        tag = f"{node.name}.{keeper.lease:x}.p{partition}.{seq}"
        record = {"p": partition, "tag": tag, "lease": keeper.lease}
        write(history, {"e": "invoke", **record})
        try:
            offset = await owner.append(batch_of(tag, 2))
        except OutcomeUnknown as exc:
            write(history, {"e": "unknown", "why": str(exc), **record})
        except NotOwner as exc:
            write(history, {"e": "refused", "why": str(exc), **record})
            with trio.move_on_after(0.2):
                await manager.changed()
        except AppendError as exc:
            write(history, {"e": "unknown", "why": repr(exc), **record})  # e.g. the object store failed: treated as unknown
        else:
            write(history, {"e": "ok", "offset": offset, **record})


def write(history: object, event: dict[str, object]) -> None:
    event["wall"] = time.time()
    history.write(json.dumps(event) + "\n")  # type: ignore[attr-defined]
    history.flush()  # type: ignore[attr-defined]


async def main() -> None:
    parser = argparse.ArgumentParser()
    for name in ("etcd", "s3", "bucket", "object-prefix", "key-prefix", "node", "topic", "history"):
        parser.add_argument(f"--{name}", required=True)
    parser.add_argument("--partitions", type=int, required=True)
    parser.add_argument("--ttl", type=int, default=3)
    args = parser.parse_args()
    config = ClusterConfig(
        args.etcd, args.s3, args.bucket, args.object_prefix, ClusterKeys(args.key_prefix.encode()), ttl=args.ttl
    )
    node = ClusterNode(config, args.node, rejoin=True)
    with open(args.history, "a", buffering=1) as history:
        async with trio.open_nursery() as nursery:
            await nursery.start(node.run)
            print(json.dumps({"ready": args.node}), flush=True)
            for partition in range(args.partitions):
                nursery.start_soon(append_loop, node, args.topic, partition, history)


if __name__ == "__main__":
    trio.run(main)
