"""The signing layer alone: sealed frames and manifest parts open only with the topic's sender's key, unsigned ones
only where signatures are optional, replays and repeated message ids are refused with their reasons."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedpeft_edge.errors import AuthError, ConfigError
from fedpeft_edge.transport.signing import MessageIds, Signing
from fedpeft_edge.wire.auth import ENVELOPE_BYTES, Signer, Verifier
from fedpeft_edge.wire.chunk import is_manifest, manifests_for, parse_manifest

TOPIC = "fedpeft/r/s2d/dev-a"


def _pair(require: bool = True) -> tuple[Signing, Signing, Ed25519PrivateKey]:
    key = Ed25519PrivateKey.generate()
    server = Signing(Signer(key), None, require)
    device = Signing(None, Verifier({"0": key.public_key()}), require)
    return server, device, key


def _reason(call: object, *args: object) -> str:
    with pytest.raises(AuthError) as info:
        call(*args)  # type: ignore[operator]
    return info.value.reason


def test_a_sealed_frame_opens_once_with_the_senders_key() -> None:
    server, device, _ = _pair()
    payload = b"".join(server.seal(TOPIC, [b"frame ", memoryview(b"body")]))
    assert bytes(device.open("0", TOPIC, payload)) == b"frame body"
    assert _reason(device.open, "0", TOPIC, payload) == "replayed"
    assert _reason(device.open, "0", "fedpeft/r/s2d/dev-b", b"".join(server.seal(TOPIC, [b"x"]))) == "bad_signature"
    assert _reason(device.open, "dev-b", TOPIC, b"".join(server.seal(TOPIC, [b"x"]))) == "unknown_sender"


def test_unsigned_frames_pass_only_where_signatures_are_optional() -> None:
    _, strict, _ = _pair(require=True)
    _, lax, _ = _pair(require=False)
    assert _reason(strict.open, "0", TOPIC, b"plain") == "unsigned"
    assert bytes(lax.open("0", TOPIC, b"plain")) == b"plain"
    assert _reason(Signing(None, None, False).open, "0", TOPIC,
                   b"".join(_pair()[0].seal(TOPIC, [b"x"]))) == "unknown_sender"
    assert Signing(None, None, False).seal(TOPIC, [b"x"]) == [b"x"]


def test_manifest_parts_are_signed_one_packet_each_and_verify() -> None:
    server, device, _ = _pair()
    parts = manifests_for(b"p" * 30_000, 1024, 1024 - ENVELOPE_BYTES, b"\1" * 16)
    packets = server.seal_manifests(TOPIC, parts)
    assert len(packets) == len(parts) > 1 and all(len(p) <= 1024 for p in packets)
    opened = [device.open("0", TOPIC, p) for p in packets]
    assert all(is_manifest(f) for f in opened) and [parse_manifest(f) for f in opened] == parts
    forged = Signing(Signer(Ed25519PrivateKey.generate()), None, True).seal_manifests(TOPIC, parts[:1])[0]
    assert _reason(device.open, "0", TOPIC, forged) == "bad_signature"
    with pytest.raises(ConfigError):
        device.seal_manifests(TOPIC, parts)


def test_chunks_from_a_sender_without_a_key_are_refused_where_required() -> None:
    _, device, _ = _pair()
    device.check_chunk_sender("0")
    assert _reason(device.check_chunk_sender, "dev-x") == "unknown_sender"
    Signing(None, None, False).check_chunk_sender("dev-x")


def test_message_ids_are_remembered_within_the_window() -> None:
    ids = MessageIds(window=3)
    ids.check_new("d1", "m1")
    ids.check_new("d2", "m1")  # ids are per sender
    assert _reason(ids.check_new, "d1", "m1") == "duplicate"
    for m in ("m2", "m3", "m4"):
        ids.check_new("d1", m)
    ids.check_new("d1", "m1")  # forgotten past the window (the signature's replay window still holds)
