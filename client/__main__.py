"""``python -m pybroker``: the ``pybroker`` command without its console
script (the bench starts its brokers this way)."""

import sys

from .server.cli import main

sys.exit(main())
