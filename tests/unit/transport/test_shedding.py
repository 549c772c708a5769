"""Shedding a flooding sender: the server's per-device subscriptions, one unsubscribed while it floods (the
broker then discards its packets) and subscribed again after comm_args.shed_s; against a real mosquitto."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import yaml
from paho.mqtt.enums import CallbackAPIVersion

from fedpeft_edge.config import CommArgs
from fedpeft_edge.drops import DroppedMessage
from fedpeft_edge.protocol import keys as M
from fedpeft_edge.transport.mqtt import MqttCommManager
from fedpeft_edge.transport.provision import provision
from fedpeft_edge.transport.shedding import SenderShed
from fedpeft_edge.transport.topics import Topics

pytestmark = pytest.mark.timeout(60)


class _Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_known_devices_are_subscribed_by_name_and_one_can_be_shed_for_a_while() -> None:
    topics, clock = Topics("fedpeft", "r"), _Clock()
    shed = SenderShed(topics, ["d2", "d1"], shed_s=10.0, clock=clock)
    assert shed.subscriptions() == ["fedpeft/r/d2s/d1", "fedpeft/r/presence/d1", "fedpeft/r/d2s/d2",
                                    "fedpeft/r/presence/d2"]
    assert shed.shed("d2") and not shed.shed("d2")  # once
    assert not shed.shed("d9")  # not a known device: its topics were never subscribed
    assert shed.subscriptions() == ["fedpeft/r/d2s/d1", "fedpeft/r/presence/d1"]
    clock.t += 9.9
    assert shed.due() == [] and shed.shed_now == ("d2",)
    clock.t += 0.2
    assert shed.due() == ["d2"] and shed.shed_now == ()
    assert len(shed.subscriptions()) == 4


def test_without_known_devices_the_wildcards_stay_and_nothing_is_shed() -> None:
    shed = SenderShed(Topics("fedpeft", "r"), None, shed_s=10.0)
    assert shed.subscriptions() == ["fedpeft/r/d2s/+", "fedpeft/r/presence/+"]
    assert not shed.shed("d2")
    assert not SenderShed(Topics("fedpeft", "r"), ["d2"], shed_s=0.0).shed("d2")  # shed_s 0: never


def _server_args(tmp_path: Path, broker: Any, **kw: Any) -> CommArgs:
    prov = provision(tmp_path / "prov", ["d1", "d2"])
    snippet = yaml.safe_load((prov.node_dir("0") / "comm_args.yaml").read_text())["comm_args"]
    snippet.pop("username", None)
    snippet.pop("password_file", None)  # the test broker is anonymous; the keys are what matter here
    return CommArgs(broker_host=broker.host, broker_port=broker.port, **{**snippet, **kw})


def _count(drops: list[DroppedMessage], sender: str) -> int:
    return sum(d.count for d in drops if d.sender == sender)


def test_a_flooding_device_is_shed_at_the_broker_and_subscribed_again(tmp_path: Path, mosquitto_broker: Any) -> None:
    drops: list[DroppedMessage] = []
    args = _server_args(tmp_path, mosquitto_broker, sender_rate_per_s=1.0, sender_burst=3, shed_s=1.5)
    server = MqttCommManager(args, "sh", M.SERVER_ID, on_drop=drops.append)
    raw = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    raw.connect(mosquitto_broker.host, mosquitto_broker.port)
    raw.loop_start()

    def flood(n: int) -> None:
        for _ in range(n):
            raw.publish(server.topics.d2s("d2"), b"junk", qos=1).wait_for_publish(5)

    def serve(seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            server.poll(0.05)

    try:
        flood(20)
        serve(0.5)  # over the rate: shed
        seen = _count(drops, "d2")
        assert 4 <= seen <= 20 and server._shed.shed_now == ("d2",)
        flood(300)  # the broker has no subscriber for d2's up-link now: the server sees none of it
        raw.publish(server.topics.d2s("d1"), b"junk", qos=1).wait_for_publish(5)  # another device still arrives
        serve(0.5)
        assert _count(drops, "d2") == seen
        assert _count(drops, "d1") == 1
        serve(1.5)  # shed_s is up: subscribed again
        assert server._shed.shed_now == ()
        raw.publish(server.topics.d2s("d2"), b"junk", qos=1).wait_for_publish(5)
        serve(0.5)
        assert _count(drops, "d2") == seen + 1
    finally:
        raw.loop_stop()
        raw.disconnect()
        server.close()
