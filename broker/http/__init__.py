"""The HTTP side: health, Prometheus metrics, a JSON API, Server-Sent Events
and a dashboard, on their own port (``Config.http_port``, 7421 by default).

h11 over Trio, one task per connection; it shares nothing with the binary
protocol's codec but the batch format (``encode_batch`` / ``decode_batch``)
used to publish and read messages. Modules:

- :mod:`.server`: the listener and the connection loop (limits, timeouts).
- :mod:`.access`: credentials (Bearer, Basic) and permissions, 401 and 403.
- :mod:`.routes`: which handler answers which method and path.
- :mod:`.api`: health and the JSON API; :mod:`.validate`: checking input;
  :mod:`.state`: the figures shown (topics, subscriptions, lag).
- :mod:`.metrics`: ``GET /metrics`` in the Prometheus text format.
- :mod:`.sse`: ``GET /v1/topics/{topic}/events``.
- :mod:`.dashboard` and ``static/dashboard.html``: ``GET /``.
- :mod:`.rates`: message rates from the topics' counters.
"""

from .server import HttpServer

__all__ = ["HttpServer"]
