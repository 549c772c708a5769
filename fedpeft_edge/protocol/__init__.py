"""The round protocol, in one place: message ids and keys (keys.py), typed wire messages (messages.py), who may
send which on which channel (roles.py), the local events that have no wire form (events.py), the per-round
device report (report.py) and the field checks parsing applies (fields.py)."""

from fedpeft_edge.protocol.events import LOCAL_EVENTS, ConnectionReady, LocalEvent, Presence, Throttled, Timer
from fedpeft_edge.protocol.keys import SERVER_ID
from fedpeft_edge.protocol.messages import (
    DEVICE_MESSAGES,
    MESSAGE_CLASSES,
    SERVER_MESSAGES,
    ClientStatus,
    DeviceErrorReport,
    Finish,
    Join,
    JoinAck,
    ProtocolMessage,
    RoundSync,
    RoundTask,
    SharedModel,
    Update,
    parse,
    sender_of,
)
from fedpeft_edge.protocol.report import DeviceReport, EvalReport
from fedpeft_edge.protocol.roles import Channel

__all__ = [
    "DEVICE_MESSAGES", "LOCAL_EVENTS", "MESSAGE_CLASSES", "SERVER_ID", "SERVER_MESSAGES", "Channel", "ClientStatus",
    "ConnectionReady", "DeviceErrorReport", "DeviceReport", "EvalReport", "Finish", "Join", "JoinAck", "LocalEvent",
    "Presence", "ProtocolMessage", "RoundSync", "RoundTask", "SharedModel", "Throttled", "Timer", "Update", "parse",
    "sender_of",
]
