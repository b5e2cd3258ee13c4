"""Small counters the broker keeps for its metrics, cheap enough for hot paths.

No I/O and no imports from the rest of the broker, so any layer (the log,
the sessions, the HTTP side) can record into them.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

#: Seconds: from a fast page-cache fsync (~0.1 ms) to a struggling disk.
FSYNC_BUCKETS: tuple[float, ...] = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
)


class Histogram:
    """A Prometheus-style histogram: counts per upper bound, plus sum and count.

    ``observe`` is one bisect and two additions; the cumulative counts
    Prometheus wants are computed only when read (:meth:`cumulative`).
    """

    __slots__ = ("bounds", "counts", "sum", "count")

    def __init__(self, bounds: Sequence[float] = FSYNC_BUCKETS) -> None:
        self.bounds = tuple(sorted(bounds))
        # One slot per bound plus the +Inf overflow slot.
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations <= bound) pairs, ending with +Inf."""
        out: list[tuple[float, int]] = []
        running = 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts):
            running += n
            out.append((bound, running))
        return out
