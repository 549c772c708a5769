"""The round protocol, in one place: message ids and keys (keys.py), typed messages (messages.py), the
per-round device report (report.py) and the field checks parsing applies (fields.py)."""

from fedpeft_edge.protocol.keys import SERVER_ID
from fedpeft_edge.protocol.messages import (
    DEVICE_MESSAGES,
    MESSAGE_CLASSES,
    SERVER_MESSAGES,
    ClientStatus,
    ConnectionReady,
    DeviceErrorReport,
    Finish,
    Join,
    JoinAck,
    Presence,
    ProtocolMessage,
    RoundSync,
    RoundTask,
    SharedModel,
    Timer,
    Update,
    parse,
    sender_of,
)
from fedpeft_edge.protocol.report import DeviceReport, EvalReport

__all__ = [
    "SERVER_ID", "DEVICE_MESSAGES", "MESSAGE_CLASSES", "SERVER_MESSAGES", "ClientStatus", "ConnectionReady",
    "DeviceErrorReport", "DeviceReport", "EvalReport", "Finish", "Join", "JoinAck", "Presence", "ProtocolMessage",
    "RoundSync", "RoundTask", "SharedModel", "Timer", "Update", "parse", "sender_of",
]
