"""The broker launcher gives broker processes what 1000 devices need: file descriptors and no connection cap."""

from __future__ import annotations

import subprocess

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from fedpeft_edge.transport.broker import _mosquitto_config, find_mosquitto, start_broker
from fedpeft_edge.transport.rabbitmq import nofile_limit, with_nofile


def test_with_nofile_raises_a_lowered_soft_limit_to_the_hard_limit() -> None:
    lowered = ["sh", "-c", 'ulimit -S -n 64 && exec "$@"', "sh"]
    out = subprocess.run([*lowered, *with_nofile(["sh", "-c", "ulimit -n"])], capture_output=True, text=True,
                         check=True).stdout.strip()
    plain = subprocess.run([*lowered, "sh", "-c", "ulimit -n"], capture_output=True, text=True,
                           check=True).stdout.strip()
    assert plain == "64"
    assert out == str(nofile_limit()) and nofile_limit() > 64


def test_mosquitto_config_lifts_the_connection_cap() -> None:
    conf = _mosquitto_config("127.0.0.1", 1883, None).splitlines()
    assert "max_connections -1" in conf and "set_tcp_nodelay true" in conf


@pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed")
def test_started_mosquitto_accepts_the_config_and_clients() -> None:
    with start_broker(kind="mosquitto") as broker:
        client = mqtt.Client(CallbackAPIVersion.VERSION2)
        client.connect(broker.host, broker.port)
        client.disconnect()
