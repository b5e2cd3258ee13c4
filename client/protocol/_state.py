"""Who may send which frame when: the handshake state and its legal
transitions, as tables (protocol.md, "Handshake", "GOODBYE").

Rules:

- Both sides start in AWAIT_HELLO. The client may send only HELLO; the server
  may send only a fatal ERROR (to refuse a connection that never says hello).
- After HELLO: AWAIT_WELCOME. The server may send WELCOME or ERROR; the
  client sends nothing.
- After WELCOME: OPEN. Each side may send the frames of its direction
  (``CLIENT_SENDS``, ``SERVER_SENDS``).
- A side that has sent GOODBYE or a fatal ERROR sends nothing more; frames
  received from such a side are UNEXPECTED_FRAME.

The state is shared by both sides of one connection: HELLO and WELCOME move
it forward whichever side is looking (``ADVANCES``). The connection
(:mod:`._connection`) applies these tables; nothing else decides legality.
"""

from __future__ import annotations

import enum

from ._wire import FrameType


class Role(enum.Enum):
    CLIENT = "client"
    SERVER = "server"


class State(enum.Enum):
    AWAIT_HELLO = "await-hello"
    AWAIT_WELCOME = "await-welcome"
    OPEN = "open"


CLIENT_SENDS = frozenset(
    {
        FrameType.PUBLISH,
        FrameType.SUBSCRIBE,
        FrameType.UNSUBSCRIBE,
        FrameType.CREDIT,
        FrameType.ACK,
        FrameType.INFO,
        FrameType.GROUPS,
        FrameType.TOPICS,
        FrameType.PING,
        FrameType.PONG,
        FrameType.ERROR,
        FrameType.GOODBYE,
    }
)
SERVER_SENDS = frozenset(
    {
        FrameType.PUBACK,
        FrameType.SUBACK,
        FrameType.UNSUBACK,
        FrameType.DELIVER,
        FrameType.GROUP_DELIVER,
        FrameType.INFO_REPLY,
        FrameType.GROUPS_REPLY,
        FrameType.TOPICS_REPLY,
        FrameType.PING,
        FrameType.PONG,
        FrameType.ERROR,
        FrameType.GOODBYE,
    }
)

#: (sender, state) -> frame types the sender may send in that state.
SENDS: dict[tuple[Role, State], frozenset[FrameType]] = {
    (Role.CLIENT, State.AWAIT_HELLO): frozenset({FrameType.HELLO}),
    (Role.SERVER, State.AWAIT_HELLO): frozenset({FrameType.ERROR}),
    (Role.CLIENT, State.AWAIT_WELCOME): frozenset(),
    (Role.SERVER, State.AWAIT_WELCOME): frozenset({FrameType.WELCOME, FrameType.ERROR}),
    (Role.CLIENT, State.OPEN): CLIENT_SENDS,
    (Role.SERVER, State.OPEN): SERVER_SENDS,
}

#: Frame types that move the shared handshake state forward: (from, to).
ADVANCES: dict[FrameType, tuple[State, State]] = {
    FrameType.HELLO: (State.AWAIT_HELLO, State.AWAIT_WELCOME),
    FrameType.WELCOME: (State.AWAIT_WELCOME, State.OPEN),
}
