"""FedML Message <-> framed payload (wire.codec's JSON header + one blob): shared by every comm manager.

The MQTT and the in-memory comm managers frame a message the same way, so the bytes they meter are the same.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from fedpeft_edge.errors import CodecError
from fedpeft_edge.protocol import keys as M
from fedpeft_edge.transport.fedml import Message
from fedpeft_edge.wire.codec import BLOB_KEY_PARAM, TensorParts

if TYPE_CHECKING:
    from fedpeft_edge.config import CommArgs

REQUIRED_KEYS = (M.MSG_ARG_KEY_TYPE, M.MSG_ARG_KEY_SENDER, M.MSG_ARG_KEY_RECEIVER)
# Keys the blob may not be put back under (it would overwrite the frame's own fields).
_RESERVED = (M.MSG_ARG_KEY_TYPE, M.MSG_ARG_KEY_SENDER, M.MSG_ARG_KEY_RECEIVER, M.MSG_ARG_KEY_MSG_ID,
             M.MSG_ARG_KEY_ROUND, BLOB_KEY_PARAM)
_MAX_ROUND = 2**31


def is_scalar(value: Any) -> bool:
    """An int (not a bool) or a string: what ids, types and msg ids may be."""
    return isinstance(value, (int, str)) and not isinstance(value, bool)


def pop_blob(params: dict[str, Any]) -> memoryview | TensorParts | None:
    """Take the one binary param out of `params` (its key is kept under BLOB_KEY_PARAM) and return it."""
    keys = [k for k, v in params.items() if isinstance(v, (bytes, bytearray, memoryview, TensorParts))]
    if len(keys) > 1:
        raise CodecError(f"a message carries at most one binary param, got {keys}; merge them into one blob")
    if not keys:
        return None
    value = params.pop(keys[0])
    params[BLOB_KEY_PARAM] = keys[0]
    return value if isinstance(value, TensorParts) else memoryview(value)


def check_frame(node: str, params: dict[str, Any], me: str | None = None) -> None:
    """The transport's own fields, typed and ranged, before anything is dispatched on them: a decoded frame
    names its type, sender and receiver (ints or short strings), its sender is the node it came from, its
    receiver is `me` (when given), and its round (if any) is an int in [0, 2^31)."""
    missing = [k for k in REQUIRED_KEYS if k not in params]
    if missing:
        raise CodecError(f"message from {node} lacks {missing}; every message needs {REQUIRED_KEYS}")
    for key in (*REQUIRED_KEYS, M.MSG_ARG_KEY_MSG_ID):
        value = params.get(key)
        if key in params and not (is_scalar(value) and len(str(value)) <= 128):
            raise CodecError(f"message from {node}: {key} must be an int or a short string, got "
                             f"{type(value).__name__} {str(value)[:40]!r}")
    if str(params[M.MSG_ARG_KEY_SENDER]) != node:
        raise CodecError(f"message claims sender {str(params[M.MSG_ARG_KEY_SENDER])[:40]!r} on node {node}'s "
                         "channel")
    if me is not None and str(params[M.MSG_ARG_KEY_RECEIVER]) != me:
        raise CodecError(f"message from {node} is addressed to {str(params[M.MSG_ARG_KEY_RECEIVER])[:40]!r}, "
                         f"not {me}")
    rnd = params.get(M.MSG_ARG_KEY_ROUND)
    if rnd is not None and not (isinstance(rnd, int) and not isinstance(rnd, bool) and 0 <= rnd < _MAX_ROUND):
        raise CodecError(f"message from {node}: {M.MSG_ARG_KEY_ROUND} must be an int in [0, 2^31), got "
                         f"{str(rnd)[:40]!r}")


def message_from_frame(node: str, params: dict[str, Any], blob: memoryview | None) -> Any:
    """The FedML Message of a decoded frame, with the blob put back under its own key."""
    blob_key = params.pop(BLOB_KEY_PARAM, None)
    if (blob is None) != (blob_key is None) or (blob_key is not None and (
            not isinstance(blob_key, str) or len(blob_key) > 128 or blob_key in _RESERVED)):
        raise CodecError(f"message from {node} has a malformed blob key {str(blob_key)[:80]!r}")
    if blob_key is not None:
        params[blob_key] = blob
    message = Message()
    message.init_from_json_object(params)
    return message


def round_of(params: Mapping[str, Any]) -> int | None:
    """The round a message's params name, if any (for metering)."""
    value = params.get(M.MSG_ARG_KEY_ROUND)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def ack_timeout_s(comm_args: CommArgs, bytes_ahead: int) -> float:
    """How long a packet's PUBACK may take: comm_args.publish_timeout_s plus the time `bytes_ahead` (the
    packet and whatever unacknowledged bytes precede it) take at comm_args.min_link_rate_bps."""
    return comm_args.publish_timeout_s + 8 * bytes_ahead / comm_args.min_link_rate_bps
