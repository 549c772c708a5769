"""FedML Message <-> framed payload (wire.codec's JSON header + one blob): shared by every comm manager.

The MQTT and the in-memory comm managers frame a message the same way, so the bytes they meter are the same.
"""

from __future__ import annotations

from typing import Any

from fedpeft_edge.errors import CodecError
from fedpeft_edge.protocol import keys as M
from fedpeft_edge.transport.fedml import Message
from fedpeft_edge.wire.codec import BLOB_KEY_PARAM

REQUIRED_KEYS = (M.MSG_ARG_KEY_TYPE, M.MSG_ARG_KEY_SENDER, M.MSG_ARG_KEY_RECEIVER)


def pop_blob(params: dict[str, Any]) -> memoryview | None:
    """Take the one binary param out of `params` (its key is kept under BLOB_KEY_PARAM) and return it."""
    keys = [k for k, v in params.items() if isinstance(v, (bytes, bytearray, memoryview))]
    if len(keys) > 1:
        raise CodecError(f"a message carries at most one binary param, got {keys}; merge them into one blob")
    if not keys:
        return None
    blob = memoryview(params.pop(keys[0]))
    params[BLOB_KEY_PARAM] = keys[0]
    return blob


def check_frame(node: str, params: dict[str, Any]) -> None:
    """A decoded frame must name its type, sender and receiver, and its sender must be the node it came from."""
    missing = [k for k in REQUIRED_KEYS if k not in params]
    if missing:
        raise CodecError(f"message from {node} lacks {missing}; every message needs {REQUIRED_KEYS}")
    if str(params[M.MSG_ARG_KEY_SENDER]) != node:
        raise CodecError(f"message claims sender {params[M.MSG_ARG_KEY_SENDER]!r} on node {node}'s channel")


def message_from_frame(node: str, params: dict[str, Any], blob: memoryview | None) -> Any:
    """The FedML Message of a decoded frame, with the blob put back under its own key."""
    blob_key = params.pop(BLOB_KEY_PARAM, None)
    if (blob is None) != (blob_key is None) or (blob_key is not None and not isinstance(blob_key, str)):
        raise CodecError(f"message from {node} has a malformed blob key {blob_key!r}")
    if blob_key is not None:
        params[blob_key] = blob
    message = Message()
    message.init_from_json_object(params)
    return message


def round_of(params: dict[str, Any]) -> int | None:
    """The round a message's params name, if any (for metering)."""
    value = params.get(M.MSG_ARG_KEY_ROUND)
    return value if isinstance(value, int) and not isinstance(value, bool) else None
