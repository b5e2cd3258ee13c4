"""Latency: p50/p99/p99.9 publish-to-deliver at a fixed offered rate.

    python benchmarks/latency.py --rate 10000 --subscribers 10 --duration 10

The same as `pybroker bench latency ...` (every option: --help). The code
lives in broker/bench/ so the installed command has it too; this script runs
it from this source tree. See benchmarks/README.md.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pybroker.server.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["latency", *sys.argv[1:]]))
