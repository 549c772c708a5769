"""Field checks for parsing messages: every value's type and range, or a ProtocolError naming field and fix."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from fedpeft_edge.errors import ProtocolError
from fedpeft_edge.protocol.keys import SERVER_ID
from fedpeft_edge.wire.codec import TensorParts

MAX_ID_CHARS = 128
MAX_ROUND = 10**9
MAX_SAMPLES = 10**9  # a device declaring more samples than this is lying or misconfigured
MAX_TEXT_CHARS = 4096  # error and refusal texts
MAX_DEPTH = 8  # nesting of JSON-like values (metrics, profile, data stats)
MAX_ITEMS = 20_000  # scalars and containers in one JSON-like value
_FORBIDDEN_ID_CHARS = ("/", "+", "#", "\x00")


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def fail(field: str, value: Any, problem: str, fix: str) -> ProtocolError:
    """The error for one bad field: which field, what value, what is wrong and how to fix it."""
    return ProtocolError(f"{field}={_show(value)} {problem}; {fix}")


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_int(value: Any, field: str, lo: int, hi: int) -> int:
    if not is_int(value):
        raise fail(field, value, "is not an integer", f"send an integer in [{lo}, {hi}]")
    if not lo <= value <= hi:
        raise fail(field, value, f"is outside [{lo}, {hi}]", f"send an integer in [{lo}, {hi}]")
    return int(value)


def check_opt_int(value: Any, field: str, lo: int, hi: int) -> int | None:
    return None if value is None else check_int(value, field, lo, hi)


def check_round(value: Any, field: str = "round_idx") -> int:
    return check_int(value, field, 0, MAX_ROUND)


def check_opt_round(value: Any, field: str = "round_idx") -> int | None:
    return None if value is None else check_round(value, field)


def check_number(value: Any, field: str, lo: float = -math.inf, hi: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise fail(field, value, "is not a number", "send a finite number")
    if not math.isfinite(value):
        raise fail(field, value, "is not finite", "send a finite number (no NaN or Infinity)")
    if not lo <= value <= hi:
        raise fail(field, value, f"is outside [{lo}, {hi}]", f"send a number in [{lo}, {hi}]")
    return float(value)


def check_opt_number(value: Any, field: str, lo: float = -math.inf, hi: float = math.inf) -> float | None:
    return None if value is None else check_number(value, field, lo, hi)


def check_bool(value: Any, field: str) -> bool:
    if not isinstance(value, bool):
        raise fail(field, value, "is not a boolean", "send true or false")
    return value


def check_text(value: Any, field: str, max_chars: int = MAX_TEXT_CHARS) -> str:
    if not isinstance(value, str):
        raise fail(field, value, "is not a string", "send a string")
    if len(value) > max_chars:
        raise fail(field, value, f"is {len(value)} characters long (limit {max_chars})", "send a shorter text")
    return value


def check_opt_text(value: Any, field: str, max_chars: int = MAX_TEXT_CHARS) -> str | None:
    return None if value is None else check_text(value, field, max_chars)


def check_choice(value: Any, field: str, allowed: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise fail(field, value, "is not a known value", f"send one of {', '.join(allowed)}")
    return value


def check_node_id(value: Any, field: str = "sender") -> str:
    """A node id as the transport routes it (a topic level): a string or an int, returned as a string."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise fail(field, value, "is not a node id", "use a string (or integer) id")
    text = str(value)
    if not text or len(text) > MAX_ID_CHARS or any(c in text for c in _FORBIDDEN_ID_CHARS):
        raise fail(field, value, "cannot be a node id",
                   f"use 1-{MAX_ID_CHARS} characters without '/', '+', '#' or NUL")
    return text


def check_device_id(value: Any, field: str = "sender") -> str:
    """A device's id: a valid node id that is never the server's (SERVER_ID is reserved)."""
    text = check_node_id(value, field)
    if text == str(SERVER_ID):
        raise fail(field, value, f"is the server's reserved id {SERVER_ID!r}",
                   "give the device another --device-id")
    return text


def check_server_id(value: Any, field: str = "sender") -> str:
    if str(value) != str(SERVER_ID) or isinstance(value, bool):
        raise fail(field, value, "is not the server", f"only the server ({SERVER_ID}) sends this message")
    return str(SERVER_ID)


def check_blob(value: Any, field: str) -> bytes | memoryview | TensorParts:
    """Binary tensor data: bytes off the wire, or an update still in parts (a message handed over in-process)."""
    if not isinstance(value, (bytes, bytearray, memoryview, TensorParts)):
        raise fail(field, type(value).__name__, "is not binary tensor data", "send the encoded tensors as the blob")
    return value if not isinstance(value, bytearray) else memoryview(value)


def check_json(value: Any, field: str, max_chars: int | None = None) -> Any:
    """A JSON-like value: bounded depth and item count, finite numbers, string keys, short strings."""
    budget = [MAX_ITEMS, max_chars if max_chars is not None else 1 << 62]
    _walk(value, field, 0, budget)
    return value


def check_opt_mapping(value: Any, field: str, max_chars: int | None = None) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise fail(field, value, "is not a mapping", "send a JSON object or null")
    return dict(check_json(value, field, max_chars))


def _leaf_cost(value: Any) -> int:
    """What a plain JSON scalar costs the size budget (as _walk charges it), or -1 if _walk must look at it."""
    t = type(value)
    if t is str:
        return len(value) + 2
    if t is int or (t is float and math.isfinite(value)):
        return 8
    return 4 if value is None or t is bool else -1


def _walk(value: Any, field: str, depth: int, budget: list[int]) -> None:
    if depth > MAX_DEPTH:
        raise fail(field, "...", f"nests deeper than {MAX_DEPTH} levels", "send a flatter value")
    budget[0] -= 1
    if budget[0] < 0:
        raise fail(field, "...", f"holds more than {MAX_ITEMS} items", "send a smaller value")
    if value is None or isinstance(value, bool):
        budget[1] -= 4
    elif isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            raise fail(field, value, "holds a non-finite number", "send finite numbers (no NaN or Infinity)")
        budget[1] -= 8
    elif isinstance(value, str):
        budget[1] -= len(value) + 2
    elif isinstance(value, Mapping):
        for k, v in value.items():
            if not isinstance(k, str):
                raise fail(field, k, "has a non-string key", "use string keys")
            budget[1] -= len(k) + 3
            if not _charge_leaf(v, depth, budget):  # a container, or a leaf over a limit: name it
                _walk(v, f"{field}.{k}", depth + 1, budget)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            if not _charge_leaf(v, depth, budget):
                _walk(v, f"{field}[{i}]", depth + 1, budget)
    else:
        raise fail(field, type(value).__name__, "is not a JSON value", "send JSON objects, lists, numbers, strings")
    if budget[1] < 0:
        raise fail(field, "...", "is too large", "send a smaller value")


def _charge_leaf(value: Any, depth: int, budget: list[int]) -> bool:
    """Charge a plain scalar child without a call of _walk and its field name (the hot path of every report);
    False (nothing charged) when _walk must see it: a container, an odd type, or a limit it would break."""
    cost = _leaf_cost(value)
    if cost < 0 or depth >= MAX_DEPTH or budget[0] < 1 or budget[1] < cost:
        return False
    budget[0] -= 1
    budget[1] -= cost
    return True
