"""Failpoints: named places in a round's commit where a test can make this
process die, after etcd's gofail (docs/cluster.md §11).

A test facility, never armed in production: the points are armed only
through the environment variable ``PYBROKER_FAILPOINTS``, read once when
this module is first imported, e.g.::

    PYBROKER_FAILPOINTS="after-put=kill@5"            # SIGKILL at the 5th round's after-put
    PYBROKER_FAILPOINTS="before-put=kill,after-commit=kill@3"

``kill`` alone is ``kill@1``. The points (rounds.py, ``RoundCommitter``; each
partition's round in a group passes each point once):

- ``before-put``: a round is sequenced and its object named; nothing is
  written yet;
- ``after-put``: the round's object is written, its transaction not sent;
- ``after-commit``: the transaction committed, nothing acknowledged yet
  (the appenders and, through ``ClusterStore.sync``, the publishers wait).

Just before the SIGKILL the process logs ``failpoint`` (the point, the
hit count, and what the caller passed: the object, the round's offsets) and
flushes stderr, so that a test can tell where it died. Disarmed, a point
costs its caller one attribute check (``if failpoints.ARMED:``), once per
round, never per message.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Mapping
from typing import Any

import attrs

from ..logs import get_logger

ENV = "PYBROKER_FAILPOINTS"
POINTS = ("before-put", "after-put", "after-commit")
ACTIONS = ("kill",)


@attrs.define
class Failpoint:
    """One armed point: ``action`` on its ``at``-th hit (counted from 1)."""

    name: str
    action: str
    at: int
    hits: int = 0


def parse(spec: str) -> dict[str, Failpoint]:
    """``name=action[@n]`` terms separated by commas; ValueError (naming
    the variable) for anything else."""
    armed: dict[str, Failpoint] = {}
    for term in (t.strip() for t in spec.split(",")):
        if not term:
            continue
        name, eq, rest = term.partition("=")
        action, at_sign, count = rest.partition("@")
        name, action = name.strip(), action.strip()
        if not eq or name not in POINTS or action not in ACTIONS:
            raise ValueError(
                f"{ENV}: {term!r} is not name=action[@n] with a name among {', '.join(POINTS)} "
                f"and an action among {', '.join(ACTIONS)}"
            )
        try:
            at = int(count) if at_sign else 1
        except ValueError:
            at = 0
        if at < 1:
            raise ValueError(f"{ENV}: {term!r}: the count after @ is a whole number from 1")
        if name in armed:
            raise ValueError(f"{ENV}: {name} is armed twice")
        armed[name] = Failpoint(name, action, at)
    return armed


def load(environ: Mapping[str, str] = os.environ) -> dict[str, Failpoint]:
    return parse(environ.get(ENV, ""))


#: The armed points, by name; empty (false) unless the variable arms some.
ARMED: dict[str, Failpoint] = load()


def hit(name: str, **context: Any) -> None:
    """Count a pass through point ``name``; act if this is its armed hit.
    Callers check ``ARMED`` first, so a disarmed point costs nothing more."""
    point = ARMED.get(name)
    if point is None:
        return
    point.hits += 1
    if point.hits != point.at:
        return
    get_logger(component="failpoints").error("failpoint", point=name, hit=point.hits, action=point.action, **context)
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)
