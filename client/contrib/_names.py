"""Queue names of other systems as topic tokens and group names."""

from __future__ import annotations

import re

# Characters a topic token may not hold (protocol.md, "Topics and
# patterns"), and % itself, the escape.
_UNSAFE = re.compile(r"[.*>%\s\x00-\x1f\x7f]")


def queue_topic(queue: str, prefix: str) -> str:
    """The topic that holds queue ``queue``'s messages, under ``prefix``."""
    return f"{prefix}.{escape(queue)}"


def group_name(queue: str, prefix: str) -> str:
    """The consumer group that is queue ``queue``, under ``prefix``."""
    return f"{prefix}-{escape(queue)}"


def escape(name: str) -> str:
    """``name`` as one topic token: the characters a token may not hold are
    percent-encoded (UTF-8 bytes), so that distinct names stay distinct."""
    return _UNSAFE.sub(lambda m: "".join(f"%{b:02X}" for b in m.group().encode()), name)
