"""The per-sender packet rate against a real mosquitto: a flooding sender's packets are dropped as rate_limited
before any signature is verified, another sender's still arrive, and the node hears of the flooding sender
through a local Throttled event (never through a frame)."""

from __future__ import annotations

import time
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from fedpeft_edge.config import CommArgs
from fedpeft_edge.drops import DroppedMessage
from fedpeft_edge.protocol import LocalEvent, Throttled
from fedpeft_edge.protocol import keys as M
from fedpeft_edge.transport.mqtt import MqttCommManager

pytestmark = pytest.mark.timeout(60)


class _LocalEvents:
    def __init__(self) -> None:
        self.events: list[LocalEvent] = []

    def receive_message(self, _type: Any, _msg: Any) -> None:
        pass

    def receive_local(self, event: LocalEvent) -> None:
        self.events.append(event)


def test_a_flooding_sender_is_rate_limited_before_verification(mosquitto_broker: Any) -> None:
    drops: list[DroppedMessage] = []
    args = CommArgs(broker_host=mosquitto_broker.host, broker_port=mosquitto_broker.port, sender_rate_per_s=1.0,
                    sender_burst=3)
    server = MqttCommManager(args, "rl", M.SERVER_ID, on_drop=drops.append)
    local = _LocalEvents()
    server.add_observer(local)
    raw = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    raw.connect(mosquitto_broker.host, mosquitto_broker.port)
    raw.loop_start()
    try:
        for _ in range(10):
            raw.publish(server.topics.d2s(7), b"junk", qos=1).wait_for_publish(5)
        raw.publish(server.topics.d2s(8), b"junk", qos=1).wait_for_publish(5)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and sum(d.count for d in drops) < 11:
            server.poll(0.2)
        by = {(d.sender, d.reason): 0 for d in drops}
        for d in drops:
            by[(d.sender, d.reason)] += d.count
        assert by.get(("7", "rate_limited"), 0) >= 6  # 3 of burst (+ at most 1 refilled), the rest limited
        assert by.get(("7", "malformed"), 0) <= 4
        assert by.get(("8", "malformed")) == 1 and ("8", "rate_limited") not in by
        throttled = [e for e in local.events if isinstance(e, Throttled)]
        assert {e.node for e in throttled} == {"7"}
        assert sum(e.packets for e in throttled) == by[("7", "rate_limited")]
    finally:
        raw.loop_stop()
        raw.disconnect()
        server.close()
