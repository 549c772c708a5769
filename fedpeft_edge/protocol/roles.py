"""Who may send what, on which channel: the protocol's one trust table.

A frame is decoded into a typed message only if its type is one its sender's role may send on the channel it
arrived on. Devices send on their own `d2s/<device>` topic; the server sends on `s2d/<device>` and, for a shared
model, on the run's model topic. Local events (protocol/events.py) appear in no row: they have no wire form.
"""

from __future__ import annotations

import enum

import fedpeft_edge.protocol.keys as K
from fedpeft_edge.drops import DropReason
from fedpeft_edge.errors import AuthError


class Channel(enum.Enum):
    """The direction (and so the sender's role) a frame travelled."""

    DEVICE_TO_SERVER = "d2s"  # sender role: device (the topic names it)
    SERVER_TO_DEVICE = "s2d"  # sender role: server
    MODEL = "model"  # sender role: server, to every device


DEVICE_TYPES = frozenset({K.MSG_TYPE_C2S_JOIN, K.MSG_TYPE_C2S_SEND_MODEL_TO_SERVER, K.MSG_TYPE_C2S_ERROR,
                          K.MSG_TYPE_C2S_CLIENT_STATUS})
WIRE_TYPES: dict[Channel, frozenset[int]] = {
    Channel.DEVICE_TO_SERVER: DEVICE_TYPES,
    Channel.SERVER_TO_DEVICE: frozenset({K.MSG_TYPE_S2C_JOIN_ACK, K.MSG_TYPE_S2C_SYNC_MODEL_TO_CLIENT,
                                         K.MSG_TYPE_S2C_FINISH}),
    Channel.MODEL: frozenset({K.MSG_TYPE_S2C_MODEL}),
}
SERVER_TYPES = WIRE_TYPES[Channel.SERVER_TO_DEVICE] | WIRE_TYPES[Channel.MODEL]

FORBIDDEN_TYPE = DropReason.FORBIDDEN_TYPE  # the drop reason of a frame whose type its sender's role may not send


def check_wire_type(channel: Channel, msg_type: object, sender: str) -> int:
    """The frame's message type if `sender`'s role may send it on `channel`; AuthError(FORBIDDEN_TYPE) if not."""
    allowed = WIRE_TYPES[channel]
    if isinstance(msg_type, bool) or not isinstance(msg_type, int) or msg_type not in allowed:
        raise AuthError(f"a frame of type {str(msg_type)[:40]!r} from {sender!r} on the {channel.value} channel is "
                        f"not one its sender may send there (allowed: {sorted(allowed)}); dropped", FORBIDDEN_TYPE)
    return msg_type
