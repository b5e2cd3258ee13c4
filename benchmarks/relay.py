"""The reference relay that `pybroker bench fanout` measures beside pybroker.

    python benchmarks/relay.py --port 7430

A minimal batch-forwarding Trio relay like peers.md's "trio-batch": one
implicit topic, each PUBLISH's batch forwarded as one bytes object to every
subscriber, write coalescing, and just enough of protocol.md for the bench's
load processes. Its code (about 100 lines) is broker/bench/relay.py, inside
the package so that an installed `pybroker bench` can start it; this script
runs it from this source tree.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pybroker.server.bench.relay import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
