"""The server manager's receive path: every message parsed; malformed ones recorded as dropped, never raised."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engine_harness import FINGERPRINT, MANIFEST, Harness

from fedpeft_edge.config import CommArgs
from fedpeft_edge.metering.bandwidth import BandwidthMeter
from fedpeft_edge.protocol import Channel, Join, JoinAck, parse
from fedpeft_edge.protocol import keys as K
from fedpeft_edge.server.manager import ServerManager
from fedpeft_edge.server.ports import ThreadTimers
from fedpeft_edge.transport.fedml import Message, message_of


class LoopbackBackend:
    """A BaseCommunicationManager that keeps what is sent (no network): enough to drive the manager."""

    def __init__(self, *_args: Any) -> None:
        self.sent: list[Any] = []
        self.observers: list[Any] = []

    def add_observer(self, observer: Any) -> None:
        self.observers.append(observer)

    def send_message(self, msg: Any) -> None:
        self.sent.append(msg)

    def post_local(self, msg: Any) -> None:
        pass

    def stop_receive_message(self) -> None:
        pass

    def close(self) -> None:
        pass


def _manager(tmp_path: Path) -> tuple[ServerManager, LoopbackBackend, Harness]:
    h = Harness(tmp_path)
    backend = LoopbackBackend()
    mgr = ServerManager(h.engine, ThreadTimers(), CommArgs(), "t", BandwidthMeter(), backend=lambda *a: backend)
    return mgr, backend, h


def _raw(**params: Any) -> Message:
    msg = Message()
    msg.msg_params = params
    return msg


def test_malformed_messages_are_recorded_and_the_loop_goes_on(tmp_path: Path) -> None:
    mgr, backend, h = _manager(tmp_path)
    for bad in (_raw(msg_type=[3], sender="d1", receiver=0),  # unhashable type (killed FedML's dispatch)
                _raw(msg_type=3, sender="0", receiver=0, round_idx=1),  # a device calling itself the server
                _raw(msg_type=999, sender="d1", receiver=0),
                _raw(msg_type=3, sender="d1", receiver=0, round_idx=-4, num_samples=1, model_params=b"x")):
        mgr.receive_message(bad.msg_params.get("msg_type"), bad)
    reasons = [r["reason"] for r in h.records("dropped_message")]
    assert reasons == ["invalid"] * 4
    assert not backend.sent


def test_a_malformed_join_is_answered_with_the_reason(tmp_path: Path) -> None:
    mgr, backend, _h = _manager(tmp_path)
    join = Join(sender="d1", backbone_fingerprint=FINGERPRINT, manifest_hash=MANIFEST.hash, num_samples=5)
    msg = message_of(join.to_params())
    msg.add_params(K.MSG_ARG_KEY_NUM_SAMPLES, -1)
    mgr.receive_message(K.MSG_TYPE_C2S_JOIN, msg)
    ack = parse(backend.sent[0].get_params(), Channel.SERVER_TO_DEVICE)
    assert isinstance(ack, JoinAck) and not ack.accepted and "num_samples" in str(ack.reason)


def test_a_good_join_reaches_the_engine_and_is_acknowledged(tmp_path: Path) -> None:
    mgr, backend, h = _manager(tmp_path)
    join = Join(sender="d1", backbone_fingerprint=FINGERPRINT, manifest_hash=MANIFEST.hash, num_samples=5)
    mgr.receive_message(K.MSG_TYPE_C2S_JOIN, message_of(join.to_params()))
    ack = parse(backend.sent[0].get_params(), Channel.SERVER_TO_DEVICE)
    assert isinstance(ack, JoinAck) and ack.accepted
    assert h.engine.rounds.devices["d1"].declared_samples == 5
