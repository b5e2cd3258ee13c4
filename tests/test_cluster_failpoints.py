"""broker/cluster/failpoints.py: the PYBROKER_FAILPOINTS grammar, and a
point that SIGKILLs its process at its armed hit and not before (in a child
process of its own; tests/test_cluster_nemesis.py uses the points in a
running cluster)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest

from helpers.procs import child_env
from pybroker.server.cluster import failpoints
from pybroker.server.cluster.failpoints import Failpoint, parse


def test_parse_arms_what_it_names() -> None:
    assert parse("") == {}
    assert parse(" , ") == {}
    assert parse("after-put=kill@5") == {"after-put": Failpoint("after-put", "kill", 5)}
    assert parse("before-put=kill, after-commit=kill@3") == {
        "before-put": Failpoint("before-put", "kill", 1),
        "after-commit": Failpoint("after-commit", "kill", 3),
    }


@pytest.mark.parametrize(
    "spec",
    ["after-put", "after-put=", "nowhere=kill", "after-put=panic", "after-put=kill@0", "after-put=kill@-1",
     "after-put=kill@x", "after-put=kill@", "after-put=kill,after-put=kill@2"],
)  # fmt: skip
def test_parse_refuses_anything_else(spec: str) -> None:
    with pytest.raises(ValueError, match=failpoints.ENV):
        parse(spec)


def test_disarmed_in_this_process() -> None:
    # The suite runs without the variable: every point is a no-op.
    assert failpoints.ARMED == {}
    failpoints.hit("after-put", object="x")


CHILD = """
import sys
from pybroker.server import logs
from pybroker.server.cluster import failpoints
logs.configure(fmt="json")
for i in range(1, 10):
    failpoints.hit("after-commit", round=i)  # another point: never fires
    print(i, flush=True)
    failpoints.hit("after-put", round=i)
"""


def run_child(spec: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", CHILD],
        env=child_env({failpoints.ENV: spec}),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_point_kills_at_its_armed_hit() -> None:
    done = run_child("after-put=kill@3")
    assert done.returncode == -signal.SIGKILL, done
    # Reached three times, killed on the third: nothing after it ran.
    assert done.stdout.split() == ["1", "2", "3"]
    records = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    assert [(r["event"], r["point"], r["hit"], r["round"]) for r in records] == [("failpoint", "after-put", 3, 3)]


def test_a_bad_variable_stops_the_process_with_its_name() -> None:
    done = run_child("after-put=kill@zero")
    assert done.returncode == 1
    assert failpoints.ENV in done.stderr
