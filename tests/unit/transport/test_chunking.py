"""The chunking layer alone: a message out as one packet or as chunks (behind signed manifest parts where the node
signs) that the inbound side puts back together, metering each transfer and recording what it refuses or frees."""

from __future__ import annotations

from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedpeft_edge.drops import DroppedMessage
from fedpeft_edge.errors import AuthError
from fedpeft_edge.metering.bandwidth import BandwidthMeter
from fedpeft_edge.transport.chunking import Outgoing, Reassembly, outgoing
from fedpeft_edge.transport.inbox import Inbound
from fedpeft_edge.transport.metering import LinkMeter
from fedpeft_edge.transport.signing import Signing
from fedpeft_edge.wire.auth import Signer, Verifier
from fedpeft_edge.wire.chunk import Reassembler

TOPIC = "fedpeft/r/d2s/dev-a"
PARAMS: dict[str, Any] = {"msg_type": 3, "sender": "dev-a", "receiver": 0, "msg_id": "m1"}


def _inbound(out: Outgoing, reassembly: Reassembly) -> list[tuple[Any, list[int], float]]:
    done = []
    for i, packet in enumerate(out.packets):
        out.sizes.append(len(packet) + 30)
        got = reassembly.assemble("dev-a", Inbound(TOPIC, packet, len(packet) + 30, 100.0 + i))
        if got[0] is not None:
            done.append(got)
    return done


def _reassembly(signing: Signing, **kw: Any) -> tuple[Reassembly, BandwidthMeter, list[DroppedMessage]]:
    meter, drops = BandwidthMeter(), []
    return Reassembly(Reassembler(**kw), signing, LinkMeter(meter, True), drops.append), meter, drops


def test_a_message_under_the_limit_is_one_packet_and_passes_as_it_is() -> None:
    out = outgoing(TOPIC, "0", PARAMS, [b"head", memoryview(b"body")], 1024, 1, True, Signing(None, None, False))
    assert (out.count, out.total) == (1, 8)
    reassembly, _, _ = _reassembly(Signing(None, None, False))
    assert _inbound(out, reassembly) == [(b"headbody", [38], 100.0)]


def test_an_unsigned_message_over_the_limit_comes_back_whole_from_its_chunks() -> None:
    body = bytes(range(256)) * 40
    out = outgoing(TOPIC, "0", PARAMS, [body], 1024, 1, True, Signing(None, None, False))
    assert out.count > 10
    reassembly, _, drops = _reassembly(Signing(None, None, False))
    [(payload, sizes, start)] = _inbound(out, reassembly)
    assert bytes(payload) == body and sizes == out.sizes and start == 100.0 and drops == []


def test_signed_chunks_follow_their_signed_manifest_and_forged_ones_are_refused() -> None:
    key = Ed25519PrivateKey.generate()
    sender = Signing(Signer(key), None, True)
    receiver = Signing(None, Verifier({"dev-a": key.public_key()}), True)
    body = b"t" * 20_000
    out = outgoing(TOPIC, "0", PARAMS, [body], 1024, 1, True, sender)
    reassembly, _, _ = _reassembly(receiver, require_manifest=True)
    [(payload, sizes, _)] = _inbound(out, reassembly)
    assert bytes(payload) == body and len(sizes) == out.count > 21  # the manifest parts are metered too
    unsigned = outgoing(TOPIC, "0", PARAMS, [body], 1024, 1, True, Signing(None, None, False))
    with pytest.raises(AuthError):
        _inbound(unsigned, reassembly)  # no verified manifest covers it: the caller records the drop


def test_a_refused_transfer_is_metered_and_recorded_and_a_stale_one_expires() -> None:
    now = [0.0]
    reassembly, meter, drops = _reassembly(Signing(None, None, False), max_total_bytes=4000, timeout_s=5.0,
                                           clock=lambda: now[0])
    big = outgoing(TOPIC, "0", PARAMS, [b"x" * 5000], 1024, 1, True, Signing(None, None, False))
    assert _inbound(big, reassembly) == []
    assert {d.reason for d in drops} == {"chunk_refused"} and len(drops) == big.count
    assert [(r.msg_type, r.chunks) for r in meter.transfers()] == [("dropped", 1)] * big.count
    del drops[:]
    part = outgoing(TOPIC, "0", PARAMS, [b"y" * 3000], 1024, 1, True, Signing(None, None, False))
    next(iter(part.packets))  # keep the first chunk back: the transfer never completes
    assert _inbound(part, reassembly) == []
    now[0] = 10.0
    reassembly.expire()
    [drop] = drops
    assert drop.reason == "transfer_expired" and f"{part.count - 1}/{part.count} chunks" in drop.detail
    expired = meter.transfers()[-1]
    assert (expired.chunks, expired.payload_bytes, expired.start) == (part.count - 1, 0, 100.0)
