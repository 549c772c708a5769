"""check_json's fast path for plain scalars charges and refuses exactly what the plain recursive walk does."""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from typing import Any

import pytest

from fedpeft_edge.errors import ProtocolError
from fedpeft_edge.protocol import fields
from fedpeft_edge.protocol.fields import MAX_DEPTH, check_json, fail


def _reference_walk(value: Any, field: str, depth: int, budget: list[int]) -> None:
    """The walk as it was before the fast path: one call (and one field name) per value."""
    if depth > MAX_DEPTH:
        raise fail(field, "...", f"nests deeper than {MAX_DEPTH} levels", "send a flatter value")
    budget[0] -= 1
    if budget[0] < 0:
        raise fail(field, "...", f"holds more than {fields.MAX_ITEMS} items", "send a smaller value")
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
            _reference_walk(v, f"{field}.{k}", depth + 1, budget)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _reference_walk(v, f"{field}[{i}]", depth + 1, budget)
    else:
        raise fail(field, type(value).__name__, "is not a JSON value", "send JSON objects, lists, numbers, strings")
    if budget[1] < 0:
        raise fail(field, "...", "is too large", "send a smaller value")


def _random_value(rng: random.Random, depth: int) -> Any:
    kind = rng.randrange(10 if depth < MAX_DEPTH + 2 else 6)
    leaves = [None, True, 3, 2.5, "x" * rng.randrange(30), float("nan"), float("inf"), b"raw", 10**20]
    if kind < 6:
        return leaves[rng.randrange(len(leaves) - (0 if rng.random() < 0.1 else 4))]
    if kind < 8:
        return {("k" * rng.randrange(1, 5) + str(i)) if rng.random() > 0.02 else i: _random_value(rng, depth + 1)
                for i in range(rng.randrange(5))}
    return [_random_value(rng, depth + 1) for _ in range(rng.randrange(5))]


def _outcome(walk: Any, value: Any, chars: int, items: int) -> tuple[str, list[int]]:
    budget = [items, chars]
    try:
        walk(value, "metrics", 0, budget)
    except ProtocolError as exc:
        return str(exc), budget
    return "ok", budget


@pytest.mark.parametrize("seed", range(6))
def test_fast_walk_matches_the_plain_walk(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(300):
        value = _random_value(rng, 0)
        for chars, items in ((1 << 62, fields.MAX_ITEMS), (rng.randrange(1, 120), fields.MAX_ITEMS),
                             (1 << 62, rng.randrange(1, 12))):
            want = _outcome(_reference_walk, value, chars, items)
            got = _outcome(fields._walk, value, chars, items)
            assert got[0] == want[0], value
            if want[0] == "ok":
                assert got[1] == want[1]


def test_a_leaf_over_a_limit_is_named() -> None:
    with pytest.raises(ProtocolError, match=r"metrics\.cpu\.t=nan holds a non-finite"):
        check_json({"cpu": {"t": float("nan")}}, "metrics")
    with pytest.raises(ProtocolError, match=r"metrics\.b=.* is too large"):
        check_json({"a": 1, "b": "y" * 50}, "metrics", max_chars=40)
