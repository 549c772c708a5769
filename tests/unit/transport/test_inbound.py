"""The receive pipeline alone (no broker, no paho): a packet becomes a Message, a Presence, nothing (not ours), or
one drop with its reason, metered where it was received; each check in its place."""

from __future__ import annotations

from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedpeft_edge.drops import DroppedMessage
from fedpeft_edge.metering.bandwidth import BandwidthMeter
from fedpeft_edge.protocol import Presence
from fedpeft_edge.protocol import keys as M
from fedpeft_edge.transport.chunking import Reassembly
from fedpeft_edge.transport.inbound import Receiver
from fedpeft_edge.transport.inbox import Inbound
from fedpeft_edge.transport.metering import LinkMeter
from fedpeft_edge.transport.presence import PresenceReader, presence_payload
from fedpeft_edge.transport.signing import Signing
from fedpeft_edge.transport.topics import Topics
from fedpeft_edge.wire.auth import Signer, Verifier
from fedpeft_edge.wire.chunk import Reassembler
from fedpeft_edge.wire.codec import encode_message

TOPICS = Topics("fedpeft", "r")
KEY = Ed25519PrivateKey.generate()


def _server(require: bool = False) -> tuple[Receiver, BandwidthMeter, list[DroppedMessage]]:
    meter, drops = BandwidthMeter(), []
    signing = Signing(None, Verifier({"dev-a": KEY.public_key()}), require)
    link = LinkMeter(meter, True)
    receiver = Receiver(TOPICS, "0", True, max_frame_bytes=1 << 20, signing=signing, sealer=None,
                        reassembly=Reassembly(Reassembler(), signing, link, drops.append),
                        presence=PresenceReader("0", signing, link), meter=link, drops=drops.append)
    return receiver, meter, drops


def _frame(msg_type: int = M.MSG_TYPE_C2S_JOIN, msg_id: str = "m1", **extra: Any) -> bytes:
    return encode_message({"msg_type": msg_type, "sender": "dev-a", "receiver": 0, "msg_id": msg_id, **extra})


def _in(topic: str, payload: bytes) -> Inbound:
    return Inbound(topic, payload, len(payload) + 20, 5.0)


def test_a_frame_on_its_senders_topic_becomes_a_message_metered_once() -> None:
    receiver, meter, drops = _server()
    msg = receiver.receive(_in(TOPICS.d2s("dev-a"), _frame(round_idx=3)))
    assert msg.get_type() == M.MSG_TYPE_C2S_JOIN and msg.get_sender_id() == "dev-a" and drops == []
    [rec] = meter.transfers()
    assert (rec.direction, rec.sent, rec.peer, rec.round, rec.msg_type, rec.msg_id) == \
        ("up", False, "dev-a", 3, M.MSG_TYPE_C2S_JOIN, "m1")


def test_what_is_not_ours_is_ignored_without_a_drop() -> None:
    receiver, meter, drops = _server()
    assert receiver.receive(_in("other/r/d2s/dev-a", _frame())) is None
    assert receiver.receive(_in(TOPICS.s2d("dev-a"), _frame())) is None  # a down-link: not the server's
    assert drops == [] and meter.transfers() == []


def test_each_check_drops_with_its_reason() -> None:
    receiver, meter, drops = _server()
    d2s = TOPICS.d2s("dev-a")
    receiver.receive(_in(d2s, b"junk"))
    receiver.receive(_in(d2s, _frame(msg_type=M.MSG_TYPE_S2C_FINISH, msg_id="m2")))  # a server's type
    receiver.receive(_in(d2s, _frame(msg_id="m3")))
    receiver.receive(_in(d2s, _frame(msg_id="m3")))  # QoS 1 redelivery
    receiver.receive(_in(TOPICS.d2s("dev-b"), _frame(msg_id="m4")))  # claims dev-a on dev-b's topic
    forged = Signer(Ed25519PrivateKey.generate()).envelope(d2s, [_frame(msg_id="m5")]) + _frame(msg_id="m5")
    receiver.receive(_in(d2s, forged))
    assert [d.reason for d in drops] == ["malformed", "forbidden_type", "duplicate", "malformed", "bad_signature"]
    assert all(d.sender == d.topic.rsplit("/", 1)[1] and d.detail for d in drops)
    # each packet metered once: what decoded with its (claimed) type, what did not as "dropped" (an AuthError
    # past the codec was metered twice before: once with its type, once more as "dropped")
    assert [r.msg_type for r in meter.transfers()] == [
        "dropped", M.MSG_TYPE_S2C_FINISH, M.MSG_TYPE_C2S_JOIN, M.MSG_TYPE_C2S_JOIN, M.MSG_TYPE_C2S_JOIN, "dropped"]


def test_signatures_required_refuse_an_unsigned_frame_and_pass_a_signed_one() -> None:
    receiver, _, drops = _server(require=True)
    d2s = TOPICS.d2s("dev-a")
    assert receiver.receive(_in(d2s, _frame())) is None and drops[-1].reason == "unsigned"
    signed = Signer(KEY).envelope(d2s, [_frame(msg_id="s1")]) + _frame(msg_id="s1")
    assert receiver.receive(_in(d2s, signed)).get_type() == M.MSG_TYPE_C2S_JOIN


def test_a_peers_presence_becomes_a_local_event_and_a_stale_signed_one_is_refused() -> None:
    receiver, meter, drops = _server()
    topic = TOPICS.presence("dev-a")
    device = Signing(Signer(KEY), None, False)
    online = presence_payload(device, topic, "dev-a", 10.0, M.PRESENCE_ONLINE)
    event = receiver.receive(_in(topic, online))
    assert event == Presence(node="dev-a", online=True, since=10.0, receiver="0")
    offline = presence_payload(device, topic, "dev-a", 10.0, M.PRESENCE_OFFLINE)
    assert receiver.receive(_in(topic, offline)).online is False
    assert receiver.receive(_in(topic, online)) is None and drops[-1].reason == "replayed"
    assert receiver.receive(_in(TOPICS.presence("0"), online)) is None  # our own
    assert receiver.receive(_in(topic, b'{"status": "maybe"}')) is None and drops[-1].reason == "malformed"
    assert len(meter.transfers()) == 4  # each peer presence once (the replayed one too), our own not at all
