"""pybroker.server: the broker (``pybroker serve``)."""

from .._version import __version__

__all__ = ["__version__"]
