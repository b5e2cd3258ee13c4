import logging

import structlog

# The broker's own fixtures, as users would enable them.
pytest_plugins = ["broker.pytest_plugin"]

# Keep test output readable: the broker logs every connection at info.
structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
