"""Fan-out throughput (1 publisher, N subscribers), with the reference relay measured in the same run.

    python benchmarks/fanout.py --subscribers 10 --messages 200000 --size 128

The same as `pybroker bench fanout ...` (every option: --help). The code
lives in broker/bench/ so the installed command has it too; this script runs
it from this source tree. See benchmarks/README.md.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pybroker.server.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["fanout", *sys.argv[1:]]))
