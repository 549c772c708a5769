"""Fuzzing the transport's receive edge (paho callback -> inbox -> decode -> verify -> dispatch) with
hypothesis: no generated packet raises out of poll(), and every refused one is a DroppedMessage with a reason.
"""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedpeft_edge.config import CommArgs
from fedpeft_edge.drops import DroppedMessage
from fedpeft_edge.protocol import keys as M
from fedpeft_edge.transport.broker import start_broker
from fedpeft_edge.transport.mqtt import MqttCommManager
from fedpeft_edge.wire.auth import Signer
from fedpeft_edge.wire.chunk import split_payload
from fedpeft_edge.wire.codec import encode_message

pytestmark = pytest.mark.timeout(120)

RUN = "fuzz"
REASONS = {"malformed", "unsigned", "bad_signature", "replayed", "stale", "unknown_sender", "chunk_refused",
           "duplicate", "transfer_expired", "handler_error", "internal_error", "inbox_full", "forbidden_type",
           "rate_limited"}
KEY = Ed25519PrivateKey.generate()


class _FedMLLikeObserver:
    """Dispatches like FedPeftCommManager.receive_message: a dict lookup on msg_type (unhashables raise)."""

    def __init__(self) -> None:
        self.handlers = {M.MSG_TYPE_C2S_JOIN: lambda m: m.get(M.MSG_ARG_KEY_PROFILE)}
        self.got = 0

    def receive_message(self, msg_type: Any, msg: Any) -> None:
        handler = self.handlers.get(msg_type)
        self.got += 1
        if handler is not None:
            handler(msg)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[MqttCommManager, list[DroppedMessage]]]:
    tmp = tmp_path_factory.mktemp("fuzz")
    broker = start_broker(kind="mosquitto")
    peers = tmp / "peers"
    peers.mkdir()
    (peers / "dev.pub").write_bytes(KEY.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    drops: list[DroppedMessage] = []
    # the fuzzer is one sender publishing thousands of packets: the per-sender rate limit (tested on its own in
    # test_sender_rate.py) would refuse most of them before the decoders this test exercises
    args = CommArgs(broker_port=broker.port, peer_keys_dir=str(peers), max_update_bytes=1 << 20,
                    max_pending_transfers=2, sender_rate_per_s=1e9)
    mgr = MqttCommManager(args, RUN, M.SERVER_ID, on_drop=drops.append)
    mgr.add_observer(_FedMLLikeObserver())
    try:
        yield mgr, drops
    finally:
        mgr.close()
        broker.stop()


TOPICS = st.sampled_from([f"fedpeft/{RUN}/d2s/dev", f"fedpeft/{RUN}/d2s/eve", f"fedpeft/{RUN}/presence/dev",
                          f"fedpeft/{RUN}/presence/0", f"fedpeft/{RUN}/s2d/dev", "other/topic",
                          f"fedpeft/{RUN}/d2s/dev/extra"])
SCALARS = st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats() | st.text(max_size=12)
VALUES = SCALARS | st.lists(SCALARS, max_size=2) | st.dictionaries(st.text(max_size=4), SCALARS, max_size=2)
PARAMS = st.fixed_dictionaries(
    {}, optional={"msg_type": VALUES, "sender": st.sampled_from(["dev", "eve", 0, None]) | VALUES,
                  "receiver": st.sampled_from([0, "0", "dev"]) | VALUES, "msg_id": VALUES, "round_idx": VALUES,
                  "_blob_key": VALUES, "profile": VALUES})


def _frame(params: dict[str, Any], blob: bytes | None) -> bytes:
    try:
        return encode_message(params, blob)
    except Exception:  # unencodable (NaN): the raw JSON goes out anyway, as an attacker would send it
        header = json.dumps(params, allow_nan=True, default=str).encode()
        return struct.pack("<4sBBHIQ", b"FPM1", 1, 1 if blob else 0, 0, len(header), len(blob or b"")) + header \
            + (blob or b"")


@st.composite
def payloads(draw: Any) -> tuple[str, bytes]:
    topic = draw(TOPICS)
    kind = draw(st.sampled_from(["random", "frame", "signed", "chunk", "presence", "truncated"]))
    if kind == "random":
        return topic, draw(st.binary(max_size=200))
    if kind == "presence":
        body = draw(st.dictionaries(st.sampled_from(["status", "node", "time", "seq"]),
                                    st.sampled_from(["ONLINE", "OFFLINE"]) | SCALARS, max_size=4))
        return topic, json.dumps(body, allow_nan=True).encode()
    frame = _frame(draw(PARAMS), draw(st.none() | st.binary(max_size=32)))
    if kind == "truncated":
        return topic, frame[:draw(st.integers(0, len(frame)))]
    if kind == "signed":
        return topic, Signer(KEY).envelope(topic, [frame]) + frame
    chunks = list(split_payload(frame, 80 + draw(st.integers(1, 64))))
    return topic, chunks[draw(st.integers(0, len(chunks) - 1))]


@settings(deadline=None, database=None, derandomize=True, max_examples=1500,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(payloads())
def test_no_packet_escapes_the_receive_edge(server: tuple[MqttCommManager, list[DroppedMessage]],
                                             packet: tuple[str, bytes]) -> None:
    mgr, drops = server
    before = len(drops)
    for topic, payload in [packet]:
        msg = mqtt.MQTTMessage(topic=topic.encode())
        msg.payload = payload
        msg.qos = 1
        mgr._on_message(None, None, msg)  # paho's callback, as the network thread calls it
    mgr.poll(timeout_s=0.0)  # must never raise
    assert all(d.reason in REASONS and d.detail for d in drops[before:]), drops[before:]
    del drops[:]


def test_the_fuzzed_server_still_serves(server: tuple[MqttCommManager, list[DroppedMessage]], tmp_path: Path) -> None:
    mgr, _ = server
    params = {"msg_type": M.MSG_TYPE_C2S_JOIN, "sender": "dev", "receiver": 0, "msg_id": "ok-1"}
    frame = encode_message(params)
    msg = mqtt.MQTTMessage(topic=f"fedpeft/{RUN}/d2s/dev".encode())
    msg.payload = Signer(KEY).envelope(f"fedpeft/{RUN}/d2s/dev", [frame]) + frame
    mgr._on_message(None, None, msg)
    assert mgr.poll(timeout_s=0.0) == 1


def test_a_full_inbox_drops_and_counts_without_blocking_paho() -> None:
    with start_broker(kind="mosquitto") as broker:
        drops: list[DroppedMessage] = []
        mgr = MqttCommManager(CommArgs(broker_port=broker.port, inbox_max_messages=5), RUN, M.SERVER_ID,
                              on_drop=drops.append)
        try:
            mgr.poll(timeout_s=0.5)  # the connection-ready message
            t0 = time.monotonic()
            for _ in range(20):
                msg = mqtt.MQTTMessage(topic=f"fedpeft/{RUN}/d2s/dev".encode())
                msg.payload = b"junk"
                mgr._on_message(None, None, msg)
            assert time.monotonic() - t0 < 1.0  # never waited for the receive thread
            mgr.poll(timeout_s=0.0)
            full = [d for d in drops if d.reason == "inbox_full"]
            assert sum(d.count for d in full) == 15 and full[0].bytes == 15 * 4
            assert sum(d.count for d in drops if d.reason == "malformed") == 5
        finally:
            mgr.close()
