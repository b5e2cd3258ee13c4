"""``pybroker bench``: benchmarks with verified delivery.

Scenarios (``pybroker bench SCENARIO --help``): ``fanout`` (1 publisher, N
subscribers, with the reference relay of ``relay.py`` measured in the same
run), ``durable`` (acknowledged msg/s per fsync policy), ``latency``
(percentiles at a fixed offered rate), ``memory`` (broker RSS idle, with
many idle connections, with a stalled subscriber), ``all``.

The parent process (``cli.py``, ``drive.py``) starts the broker or relay and
the load processes (``worker.py``), watches their progress through a shared
board (``board.py``) and verifies what every subscriber received.
"""

from __future__ import annotations

from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    # Imported here: the load processes (``python -m pybroker.server.bench.worker``) and
    # the relay run this package's __init__ first and need none of the
    # scenarios, nor the ``pybroker serve`` flags that .cli imports.
    from .cli import main as run

    return run(argv)


__all__ = ["main"]
