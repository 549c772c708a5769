"""MqttCommManager against a real mosquitto: delivery, chunking, dedup, presence, threads, hostile peers."""

from __future__ import annotations

import threading
import time
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import torch
from paho.mqtt.enums import CallbackAPIVersion

from fedpeft_edge.config import CommArgs
from fedpeft_edge.errors import TransportError
from fedpeft_edge.peft.base import Manifest, TensorSpec
from fedpeft_edge.protocol import Channel, Join, LocalEvent, Timer
from fedpeft_edge.protocol import keys as M
from fedpeft_edge.transport.fedml import Message, message_of
from fedpeft_edge.transport.manager import FedPeftCommManager
from fedpeft_edge.transport.mqtt import MqttCommManager
from fedpeft_edge.wire.codec import decode_tensors, encode_tensors

pytestmark = pytest.mark.timeout(60)


class Collector:
    """Observer that records (type, message, thread) and stops the loop after `stop_after` messages."""

    def __init__(self, mgr: MqttCommManager, stop_after: int, types: tuple[int, ...] | None = None) -> None:
        self.mgr, self.stop_after, self.types = mgr, stop_after, types
        self.got: list[tuple[Any, Any, str]] = []

    def receive_message(self, msg_type: Any, msg: Any) -> None:
        if self.types is not None and msg_type not in self.types:
            return
        self.got.append((msg_type, msg, threading.current_thread().name))
        if len(self.got) >= self.stop_after:
            self.mgr.stop_receive_message()

    def receive_local(self, event: LocalEvent) -> None:
        """Local events come typed, apart from the wire; recorded under their class name."""
        self.receive_message(type(event).__name__, event)


def _args(broker: Any, **kw: Any) -> CommArgs:
    return CommArgs(broker_host=broker.host, broker_port=broker.port, publish_timeout_s=10.0, **kw)


def _serve(mgr: MqttCommManager, timeout_s: float = 20.0) -> None:
    timer = threading.Timer(timeout_s, mgr.stop_receive_message)
    timer.start()
    try:
        mgr.handle_receive_message()
    finally:
        timer.cancel()


def _update(n: int, rnd: int = 1, sender: int = 1) -> tuple[Message, dict[str, torch.Tensor], Manifest]:
    state = {"w": torch.randn(n), "b": torch.randn(7, 3)}
    man = Manifest("full", tuple(TensorSpec.of(k, v) for k, v in state.items()))
    msg = Message(M.MSG_TYPE_C2S_SEND_MODEL_TO_SERVER, sender, M.SERVER_ID)
    msg.add_params(M.MSG_ARG_KEY_ROUND, rnd)
    msg.add_params(M.MSG_ARG_KEY_NUM_SAMPLES, 32)
    msg.add_params(M.MSG_ARG_KEY_MODEL_PARAMS, encode_tensors(state, man))
    return msg, state, man


def test_update_crosses_a_128kb_broker_limit_bit_exactly_and_is_metered(mosquitto_factory: Any) -> None:
    broker = mosquitto_factory(message_size_limit=131072)
    server = MqttCommManager(_args(broker, max_message_bytes=131072), "r1", M.SERVER_ID)
    device = MqttCommManager(_args(broker, max_message_bytes=131072), "r1", 1)
    try:
        obs = Collector(server, 1, (M.MSG_TYPE_C2S_SEND_MODEL_TO_SERVER,))
        server.add_observer(obs)
        msg, state, man = _update(300_000)
        sent = device.send_message(msg)
        _serve(server)
        (_t, got, thread), = obs.got
        assert thread == threading.current_thread().name  # handlers run on the caller's thread
        out = decode_tensors(got.get(M.MSG_ARG_KEY_MODEL_PARAMS), man, man.hash)
        assert all(torch.equal(out[k], state[k]) for k in state)
        assert got.get(M.MSG_ARG_KEY_NUM_SAMPLES) == 32 and got.get_sender_id() == 1
        assert sent.chunks > 9 and max(sent.chunk_bytes) <= 131072 + 5
        received = server.meter.totals(round=1, peer=1)
        assert received["bytes_up"] == sent.mqtt_bytes == device.meter.totals(round=1)["bytes_up"]
    finally:
        device.close()
        server.close()


def test_broker_max_packet_size_is_learned_from_connack(mosquitto_factory: Any) -> None:
    broker = mosquitto_factory(max_packet_size=20_000)
    server = MqttCommManager(_args(broker), "r2", M.SERVER_ID)
    device = MqttCommManager(_args(broker), "r2", 5)
    try:
        assert device.packet_limit() == 20_000
        obs = Collector(server, 1, (M.MSG_TYPE_C2S_SEND_MODEL_TO_SERVER,))
        server.add_observer(obs)
        msg, state, man = _update(40_000, sender=5)
        assert device.send_message(msg).chunks >= 8
        _serve(server)
        out = decode_tensors(obs.got[0][1].get(M.MSG_ARG_KEY_MODEL_PARAMS), man, man.hash)
        assert torch.equal(out["w"], state["w"])
    finally:
        device.close()
        server.close()


def test_duplicates_dropped_local_posts_dispatched_and_junk_survived(mosquitto_broker: Any) -> None:
    server = MqttCommManager(_args(mosquitto_broker), "r3", M.SERVER_ID)
    device = MqttCommManager(_args(mosquitto_broker), "r3", 2)
    raw = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    raw.connect(mosquitto_broker.host, mosquitto_broker.port)
    raw.loop_start()
    try:
        types = (M.MSG_TYPE_C2S_CLIENT_STATUS, "Timer")
        obs = Collector(server, 3, types)
        server.add_observer(obs)
        for payload in (b"junk", b"FPM1" + b"\xff" * 40, b"FPC1" + b"\x00" * 100):
            raw.publish(server.topics.d2s(2), payload, qos=1).wait_for_publish(5)
        status = Message(M.MSG_TYPE_C2S_CLIENT_STATUS, 2, M.SERVER_ID)
        status.add_params(M.MSG_ARG_KEY_MSG_ID, "fixed-id")
        device.send_message(status)
        device.send_message(status)  # a redelivery: same message id
        forged = Message(M.MSG_TYPE_C2S_CLIENT_STATUS, 9, M.SERVER_ID)  # claims another device's id
        raw.publish(server.topics.d2s(2), _frame(forged), qos=1).wait_for_publish(5)
        status2 = Message(M.MSG_TYPE_C2S_CLIENT_STATUS, 2, M.SERVER_ID)
        device.send_message(status2)
        server.post_local(Timer(name="tick"))
        _serve(server)
        time.sleep(0.3)
        server.poll(0.2)  # anything still queued would be a duplicate
        types_got = sorted(str(t) for t, _m, _th in obs.got)
        status_t = str(M.MSG_TYPE_C2S_CLIENT_STATUS)
        assert types_got == sorted([status_t, status_t, "Timer"])
        ids = [m.get(M.MSG_ARG_KEY_MSG_ID) for t, m, _th in obs.got if t == M.MSG_TYPE_C2S_CLIENT_STATUS]
        assert ids[0] == "fixed-id" and ids[1] != "fixed-id"
        assert server.meter.totals()["messages_up"] >= 6  # junk is metered too
    finally:
        raw.loop_stop()
        raw.disconnect()
        device.close()
        server.close()


def _frame(msg: Message) -> bytes:
    from fedpeft_edge.wire.codec import encode_message

    return encode_message(msg.get_params())


def test_presence_online_then_offline_on_close(mosquitto_broker: Any) -> None:
    server = MqttCommManager(_args(mosquitto_broker), "r4", M.SERVER_ID)
    try:
        obs = Collector(server, 2, ("Presence",))
        server.add_observer(obs)
        device = MqttCommManager(_args(mosquitto_broker), "r4", "jetson-1")
        device.close()
        _serve(server)
        states = [(m.node, m.online) for _t, m, _th in obs.got]
        assert states == [("jetson-1", True), ("jetson-1", False)]
    finally:
        server.close()


@pytest.mark.parametrize("echo", [True, False])
def test_presence_echo_reannounces_the_same_server_session(mosquitto_broker: Any, echo: bool) -> None:
    """A RabbitMQ cluster keeps retained presence node-local: the echo is how a late device sees the server."""
    server = MqttCommManager(_args(mosquitto_broker, presence_echo=echo), f"echo{echo}", M.SERVER_ID)
    loop = threading.Thread(target=server.handle_receive_message, daemon=True)
    loop.start()
    device = MqttCommManager(_args(mosquitto_broker), f"echo{echo}", "late-1")
    try:
        obs = Collector(device, 2, ("Presence",))
        device.add_observer(obs)
        _serve(device, timeout_s=4.0)
        seen = [(m.node, m.online, m.since) for _t, m, _th in obs.got]
        assert len(seen) == (2 if echo else 1), seen  # the retained copy, then (echo only) the re-announcement
        assert all((str(s[0]), s[1]) == (str(M.SERVER_ID), True) for s in seen), seen
        assert len({s[2] for s in seen}) == 1, "an echo must keep the session, or joined devices re-join"
    finally:
        device.close()
        server.stop_receive_message()
        loop.join(5)
        server.close()


def test_connect_failure_names_the_broker() -> None:
    from fedpeft_edge.transport.broker import free_port

    args = CommArgs(broker_port=free_port(), reconnect_min_s=0.1, reconnect_max_s=0.2)
    t0 = time.monotonic()
    with pytest.raises(TransportError, match="no connection to MQTT broker"):
        MqttCommManager(args, "r5", 1, connect_timeout_s=1.0)
    assert time.monotonic() - t0 < 5


def test_device_cannot_address_another_device(mosquitto_broker: Any) -> None:
    device = MqttCommManager(_args(mosquitto_broker), "r6", 1)
    try:
        with pytest.raises(TransportError, match="only send to the server"):
            device.send_message(Message(M.MSG_TYPE_C2S_CLIENT_STATUS, 1, 2))
    finally:
        device.close()


class _Server(FedPeftCommManager):
    """A node on the typed adapter: it sees protocol messages and invalid params, never a FedML Message."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        self.seen: list[Any] = []
        self.invalid: list[str] = []
        super().__init__(*a, (Channel.DEVICE_TO_SERVER,), **kw)

    def on_message(self, message: Any) -> None:
        self.seen.append(message)
        self.finish()

    def on_invalid(self, params: dict[str, Any], error: Any) -> None:
        self.invalid.append(str(error))


def test_fedml_comm_manager_subclass_gets_typed_messages(mosquitto_broker: Any) -> None:
    server = _Server(_args(mosquitto_broker), "r7", M.SERVER_ID)
    device = MqttCommManager(_args(mosquitto_broker), "r7", "dev3")
    try:
        bad = Message(M.MSG_TYPE_C2S_JOIN, "dev3", M.SERVER_ID)  # no fingerprint: does not parse
        device.send_message(bad)
        join = Join(sender="dev3", backbone_fingerprint="f" * 64, manifest_hash="h" * 64, num_samples=4,
                    profile={"cpu": "x"})
        device.send_message(message_of(join.to_params()))
        threading.Timer(20, server.finish).start()
        server.run()  # ConnectionReady / Presence are local events: on_local's default ignores them
        assert len(server.invalid) == 1 and "backbone_fingerprint" in server.invalid[0]
        assert server.seen == [join]
    finally:
        device.close()
        server.com_manager.close()
