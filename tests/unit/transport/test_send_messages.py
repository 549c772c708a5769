"""send_messages: a fan-out's packets interleaved across receivers, one receiver's messages kept in order."""

from __future__ import annotations

import os
import threading
from typing import Any

import pytest

from fedpeft_edge.config import CommArgs
from fedpeft_edge.protocol import keys as M
from fedpeft_edge.transport.fedml import Message
from fedpeft_edge.transport.mqtt import MqttCommManager

pytestmark = pytest.mark.timeout(60)


class Inbox:
    """Records (round, blob) of every sync message a device receives; set() once `expect` arrived."""

    def __init__(self, expect: int) -> None:
        self.got: list[tuple[int, bytes]] = []
        self.expect = expect
        self.done = threading.Event()

    def receive_message(self, msg_type: Any, msg: Any) -> None:
        if msg_type == M.MSG_TYPE_S2C_SYNC_MODEL_TO_CLIENT:
            self.got.append((msg.get(M.MSG_ARG_KEY_ROUND), bytes(msg.get(M.MSG_ARG_KEY_MODEL_PARAMS))))
            if len(self.got) >= self.expect:
                self.done.set()


def _task(receiver: int, rnd: int, blob: bytes) -> Message:
    msg = Message(M.MSG_TYPE_S2C_SYNC_MODEL_TO_CLIENT, M.SERVER_ID, receiver)
    msg.add_params(M.MSG_ARG_KEY_ROUND, rnd)
    msg.add_params(M.MSG_ARG_KEY_MODEL_PARAMS, blob)
    return msg


def test_fan_out_interleaves_receivers_and_keeps_each_ones_order(mosquitto_broker: Any) -> None:
    args = CommArgs(broker_host=mosquitto_broker.host, broker_port=mosquitto_broker.port, publish_timeout_s=10.0,
                    chunk_bytes=65_536)
    server = MqttCommManager(args, "fan", M.SERVER_ID)
    devices = {d: MqttCommManager(args, "fan", d) for d in (1, 2)}
    inboxes = {1: Inbox(2), 2: Inbox(1)}
    threads = []
    for d, dev in devices.items():
        dev.add_observer(inboxes[d])
        threads.append(threading.Thread(target=dev.handle_receive_message, daemon=True))
        threads[-1].start()
    big, small, other = os.urandom(600_000), os.urandom(1_000), os.urandom(600_000)
    try:
        recs = server.send_messages([_task(1, 1, big), _task(1, 2, small), _task(2, 1, other)])
        assert all(inboxes[d].done.wait(20) for d in inboxes)
    finally:
        for dev in devices.values():
            dev.stop_receive_message()
            dev.close()
        server.close()
    first, second, third = recs
    assert not isinstance(first, Exception) and not isinstance(second, Exception) and not isinstance(third, Exception)
    assert first.chunks >= 10 and second.chunks == 1 and third.chunks >= 10
    # device 2's transfer ran beside device 1's, not after it ...
    assert third.start < first.end
    # ... and device 1 got its two messages in the order sent, bit-exact
    assert inboxes[1].got == [(1, big), (2, small)] and inboxes[2].got == [(1, other)]
    assert second.start >= first.start
    totals = server.meter.totals(peer=1)
    assert totals["bytes_down"] == first.mqtt_bytes + second.mqtt_bytes
