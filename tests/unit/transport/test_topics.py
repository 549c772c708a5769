"""Topics: per-run names, parsing, and refusal of ids that would break MQTT topic levels."""

from __future__ import annotations

import pytest

from fedpeft_edge.errors import TransportError
from fedpeft_edge.protocol import keys as M
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


def test_route_sends_the_server_to_a_device_or_the_model_topic_and_a_device_only_to_the_server() -> None:
    t = Topics("fedpeft", "r")
    assert t.route(0, "dev-a", M.MSG_TYPE_S2C_FINISH) == ("fedpeft/r/s2d/dev-a", "dev-a")
    assert t.route("0", M.BROADCAST, M.MSG_TYPE_S2C_MODEL) == ("fedpeft/r/model/0", M.BROADCAST)
    assert t.route("dev-a", 0, M.MSG_TYPE_C2S_JOIN) == ("fedpeft/r/d2s/dev-a", "0")
    for sender, receiver, msg_type in ((0, None, 7), (0, "0", 7), ("dev-a", "dev-b", 3)):
        with pytest.raises(TransportError):
            t.route(sender, receiver, msg_type)
