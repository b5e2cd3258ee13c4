"""``python -m pybroker.server.cli``: the same as ``python -m pybroker``."""

import sys

from . import main

sys.exit(main())
