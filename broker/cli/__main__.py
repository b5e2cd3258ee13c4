"""``python -m broker.cli``: the ``pybroker`` command without its console
script (the bench starts its brokers this way)."""

import sys

from . import main

sys.exit(main())
