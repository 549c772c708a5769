"""MemoryCommManager: MQTT's framing without a broker, ordered delivery, presence, encoded-byte metering."""

from __future__ import annotations

from typing import Any

import pytest

from fedpeft_edge.errors import TransportError
from fedpeft_edge.protocol import LocalEvent, Presence, Timer
from fedpeft_edge.protocol import keys as M
from fedpeft_edge.transport.fedml import Message
from fedpeft_edge.transport.memory import MemoryBus, MemoryCommManager
from fedpeft_edge.transport.mqtt import MqttCommManager
from fedpeft_edge.wire.codec import encode_message


class Collector:
    """Observer that records what it gets and stops `owner`'s loop after `stop_after` messages."""

    def __init__(self, owner: MemoryCommManager, stop_after: int, name: str, log: list[tuple[str, Any]]) -> None:
        self.owner, self.stop_after, self.name, self.log = owner, stop_after, name, log
        self.got: list[Any] = []

    def receive_message(self, msg_type: Any, msg: Any) -> None:
        self.got.append(msg)
        self.log.append((self.name, msg_type))
        if len(self.log) >= self.stop_after:
            self.owner.stop_receive_message()

    def receive_local(self, event: LocalEvent) -> None:
        self.receive_message(type(event).__name__, event)


def _update(sender: str, blob: bytes) -> Any:
    msg = Message(M.MSG_TYPE_C2S_SEND_MODEL_TO_SERVER, sender, M.SERVER_ID)
    msg.add_params(M.MSG_ARG_KEY_ROUND, 4)
    msg.add_params(M.MSG_ARG_KEY_NUM_SAMPLES, 17)
    msg.add_params(M.MSG_ARG_KEY_METRICS, {"train_loss": 0.5})
    msg.add_params(M.MSG_ARG_KEY_MODEL_PARAMS, blob)
    return msg


def test_message_arrives_as_sent_and_is_metered_as_its_encoded_frame() -> None:
    bus = MemoryBus()
    server = MemoryCommManager(bus, M.SERVER_ID)
    device = MemoryCommManager(bus, "dev0")
    log: list[tuple[str, Any]] = []
    got = Collector(server, 3, "server", log)  # dev0's presence, server's ready, the update
    server.add_observer(got)
    blob = bytes(range(256)) * 40
    msg = _update("dev0", blob)
    msg.add_params(M.MSG_ARG_KEY_MSG_ID, "m-1")
    rec = device.send_message(msg)
    server.handle_receive_message()
    update = got.got[-1]
    assert update.get_type() == M.MSG_TYPE_C2S_SEND_MODEL_TO_SERVER
    assert bytes(update.get(M.MSG_ARG_KEY_MODEL_PARAMS)) == blob
    assert update.get(M.MSG_ARG_KEY_NUM_SAMPLES) == 17 and update.get(M.MSG_ARG_KEY_ROUND) == 4
    assert update.get(M.MSG_ARG_KEY_METRICS) == {"train_loss": 0.5}
    assert str(update.get_sender_id()) == "dev0"
    # the same frame MQTT would publish: the codec's bytes, byte for byte
    params = dict(msg.get_params())
    params.pop(M.MSG_ARG_KEY_MODEL_PARAMS)
    params["_blob_key"] = M.MSG_ARG_KEY_MODEL_PARAMS
    assert rec.payload_bytes == rec.mqtt_bytes == len(encode_message(params, blob))
    inbound = [t for t in server.meter.transfers(round=4) if not t.sent]
    assert [t.payload_bytes for t in inbound] == [rec.payload_bytes]
    assert MemoryCommManager.bytes_kind == "encoded" and MqttCommManager.bytes_kind == "wire"


def test_delivery_is_in_send_order_and_presence_is_retained() -> None:
    bus = MemoryBus()
    server = MemoryCommManager(bus, M.SERVER_ID)
    log: list[tuple[str, Any]] = []
    devices = [MemoryCommManager(bus, f"dev{i}") for i in range(3)]
    late = MemoryCommManager(bus, "late")  # attaches after the server: still sees its retained presence
    seen = {"server": Collector(server, 99, "server", log)}
    server.add_observer(seen["server"])
    for d in [*devices, late]:
        seen[str(d.node_id)] = Collector(server, 99, str(d.node_id), log)
        d.add_observer(seen[str(d.node_id)])
    for i in (2, 0, 1):
        devices[i].send_message(_update(f"dev{i}", b"x" * (i + 1)))
    devices[1].close()
    server.post_local(Timer(name="stop"))
    server.add_observer(_StopOnTimer(server))
    server.handle_receive_message()
    updates = [str(m.get_sender_id()) for m in seen["server"].got if not isinstance(m, LocalEvent)
               and m.get_type() == 3]
    assert updates == ["dev2", "dev0", "dev1"]
    presence = [(m.node, "ONLINE" if m.online else "OFFLINE") for m in seen["server"].got if isinstance(m, Presence)]
    assert presence == [("dev0", "ONLINE"), ("dev1", "ONLINE"), ("dev2", "ONLINE"), ("late", "ONLINE"),
                        ("dev1", "OFFLINE")]
    late_presence = [m for m in seen["late"].got if isinstance(m, Presence)]
    assert [m.node for m in late_presence] == ["0"]  # devices hear only the server


class _StopOnTimer:
    """Stops `owner`'s loop on its own local Timer (local events never reach receive_message)."""

    def __init__(self, owner: MemoryCommManager) -> None:
        self.owner = owner

    def receive_message(self, _msg_type: Any, _msg: Any) -> None:
        pass

    def receive_local(self, event: LocalEvent) -> None:
        if isinstance(event, Timer):
            self.owner.stop_receive_message()


def test_routing_errors_and_duplicate_ids_are_refused() -> None:
    bus = MemoryBus()
    server = MemoryCommManager(bus, M.SERVER_ID)
    device = MemoryCommManager(bus, "dev0")
    with pytest.raises(TransportError, match="only send to the server"):
        device.send_message(Message(M.MSG_TYPE_C2S_JOIN, "dev0", "dev1"))
    with pytest.raises(TransportError, match="address a device id"):
        server.send_message(Message(M.MSG_TYPE_S2C_FINISH, M.SERVER_ID, M.SERVER_ID))
    with pytest.raises(TransportError, match="already on this bus"):
        MemoryCommManager(bus, "dev0")
    with pytest.raises(TransportError, match="exceeds"):
        MemoryCommManager(MemoryBus(max_message_bytes=100), "dev1").send_message(_update("dev1", b"y" * 200))


def test_a_forged_sender_is_dropped_and_metered() -> None:
    bus = MemoryBus()
    server = MemoryCommManager(bus, M.SERVER_ID)
    device = MemoryCommManager(bus, "dev0")
    log: list[tuple[str, Any]] = []
    got = Collector(server, 99, "server", log)
    server.add_observer(got)
    server.add_observer(_StopOnTimer(server))
    device.send_message(_update("dev9", b"z"))  # claims to be another device
    server.post_local(Timer(name="stop"))
    server.handle_receive_message()
    assert not [m for m in got.got if not isinstance(m, LocalEvent) and m.get_type() == 3]
    assert [t.msg_type for t in server.meter.transfers() if not t.sent and t.peer == "dev0"][-1] == "dropped"


@pytest.mark.parametrize("msg_type", [M.MSG_TYPE_LOCAL_TIMER, M.MSG_TYPE_PRESENCE, M.MSG_TYPE_CONNECTION_IS_READY,
                                      M.MSG_TYPE_S2C_FINISH, M.MSG_TYPE_S2C_SYNC_MODEL_TO_CLIENT, M.MSG_TYPE_S2C_MODEL,
                                      M.MSG_TYPE_S2C_JOIN_ACK])
def test_a_device_frame_of_a_type_only_the_server_or_the_node_itself_makes_is_dropped(msg_type: int) -> None:
    bus = MemoryBus()
    server = MemoryCommManager(bus, M.SERVER_ID)
    device = MemoryCommManager(bus, "dev0")
    got = Collector(server, 99, "server", [])
    server.add_observer(got)
    server.add_observer(_StopOnTimer(server))
    forged = Message(msg_type, "dev0", M.SERVER_ID)
    forged.add_params(M.MSG_ARG_KEY_TIMER, "deadline")
    device.send_message(forged)
    server.post_local(Timer(name="stop"))
    server.handle_receive_message()
    assert sorted(type(m).__name__ for m in got.got) == ["ConnectionReady", "Presence", "Timer"]  # never the frame
    assert [t.msg_type for t in server.meter.transfers() if not t.sent and t.peer == "dev0"][-1] == "dropped"


def test_post_local_takes_only_local_events() -> None:
    server = MemoryCommManager(MemoryBus(), M.SERVER_ID)
    with pytest.raises(TypeError, match="LocalEvent"):
        server.post_local(Message(M.MSG_TYPE_LOCAL_TIMER, M.SERVER_ID, M.SERVER_ID))
