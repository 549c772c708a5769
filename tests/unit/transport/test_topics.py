"""Topics: per-run names, parsing, and refusal of ids that would break MQTT topic levels."""

from __future__ import annotations

import pytest

from fedpeft_edge.errors import TransportError
from fedpeft_edge.transport.topics import Topics


def test_topic_names_and_parse() -> None:
    t = Topics("fedpeft", "run7")
    assert t.s2d(3) == "fedpeft/run7/s2d/3"
    assert t.d2s("jetson-1") == "fedpeft/run7/d2s/jetson-1"
    assert t.presence(0) == "fedpeft/run7/presence/0"
    assert t.all_d2s() == "fedpeft/run7/d2s/+"
    assert t.parse("fedpeft/run7/d2s/jetson-1") == ("d2s", "jetson-1")
    assert t.parse("fedpeft/run8/d2s/1") is None
    assert t.parse("fedpeft/run7/other/1") is None


@pytest.mark.parametrize("bad", ["", "a/b", "+", "dev#1"])
def test_bad_ids_are_refused(bad: str) -> None:
    with pytest.raises(TransportError, match="topic level"):
        Topics("fedpeft", "run").d2s(bad)
    with pytest.raises(TransportError):
        Topics("fedpeft", bad)
