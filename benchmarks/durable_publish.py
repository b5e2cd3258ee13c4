"""Durable publish: acknowledged messages per second for each fsync policy.

    python benchmarks/durable_publish.py --messages 300000

The same as `pybroker bench durable ...` (every option: --help). The code
lives in broker/bench/ so the installed command has it too; this script runs
it from this source tree. See benchmarks/README.md.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pybroker.server.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["durable", *sys.argv[1:]]))
