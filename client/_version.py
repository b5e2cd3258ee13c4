"""The package version, on its own so that the server can name it without
loading the client library."""

__version__ = "0.1.0"
