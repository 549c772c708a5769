"""A PUBACK's deadline grows with the bytes it waits behind: a slow link is not taken for a dead broker."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import pytest
import torch

from fedpeft_edge.config import CommArgs
from fedpeft_edge.errors import TransportError
from fedpeft_edge.peft.base import Manifest, TensorSpec
from fedpeft_edge.protocol import keys as M
from fedpeft_edge.transport.fedml import Message
from fedpeft_edge.transport.mqtt import MqttCommManager, ack_timeout_s
from fedpeft_edge.wire.codec import encode_tensors

pytestmark = pytest.mark.timeout(60)


def test_timeout_is_the_base_plus_the_bytes_at_the_floor_rate() -> None:
    args = CommArgs(publish_timeout_s=60.0, min_link_rate_bps=1e6)
    assert ack_timeout_s(args, 0) == 60.0
    assert ack_timeout_s(args, 13_536_000) == pytest.approx(60.0 + 108.288)  # a full update at 1 Mbit/s
    # the defaults: one 1 MiB chunk at 100 kbit/s adds 84 s; a 13.5 MB packet sent whole would add 18 min
    default = CommArgs()
    assert ack_timeout_s(default, default.chunk_bytes) == pytest.approx(60.0 + 83.89, abs=0.01)


def _update(n_floats: int) -> Message:
    state = {"w": torch.randn(n_floats)}
    man = Manifest("full", (TensorSpec.of("w", state["w"]),))
    msg = Message(M.MSG_TYPE_C2S_SEND_MODEL_TO_SERVER, 1, M.SERVER_ID)
    msg.add_params(M.MSG_ARG_KEY_ROUND, 1)
    msg.add_params(M.MSG_ARG_KEY_MODEL_PARAMS, encode_tensors(state, man, "fp32"))
    return msg


@pytest.mark.parametrize("chunk_bytes", [0, 65_536])
def test_a_stalled_broker_fails_the_send_after_the_scaled_timeout(mosquitto_broker: Any, chunk_bytes: int) -> None:
    # 0.5 s base + 100 kB (whole) or 64 kB (the first chunk) at 800 kbit/s
    args = CommArgs(broker_host=mosquitto_broker.host, broker_port=mosquitto_broker.port, publish_timeout_s=0.5,
                    min_link_rate_bps=800_000, chunk_bytes=chunk_bytes)
    device = MqttCommManager(args, "stall", 1)
    first = chunk_bytes or 100_000  # the packet the send waits on first (its headers add ~0.1%)
    expected = 0.5 + 8 * first / 800_000
    os.kill(mosquitto_broker.process.pid, signal.SIGSTOP)  # connected, but nothing is acknowledged any more
    try:
        t0 = time.monotonic()
        with pytest.raises(TransportError) as err:
            device.send_message(_update(25_000))  # 100 kB of tensors
        waited = time.monotonic() - t0
    finally:
        os.kill(mosquitto_broker.process.pid, signal.SIGCONT)
        device.close(publish_offline=False)
    text = str(err.value)
    print(f"chunk_bytes {chunk_bytes}: failed after {waited:.2f} s (expected {expected:.2f} s): {text}")
    assert expected - 0.05 <= waited < expected + 2.0
    assert "publish_timeout_s 0.5 s" in text and "min_link_rate_bps 800000" in text and "packet 0 (" in text
