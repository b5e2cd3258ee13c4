"""One TCP connection: the session (frames to core calls), its outbox (the
bounded outbound queue, the connection's Subscriber), its acknowledgements
and its share of the frame budget."""

from .session import Session

__all__ = ["Session"]
