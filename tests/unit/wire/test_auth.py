"""Envelope signing: verified frames pass once; forged, moved, stale, replayed and unsigned ones are refused
with their reason; the replay memory stays bounded without re-opening replays."""

from __future__ import annotations

import pathlib

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedpeft_edge.errors import AuthError
from fedpeft_edge.wire.auth import ENVELOPE_BYTES, Signer, Verifier

KEY = Ed25519PrivateKey.generate()
TOPIC = "fedpeft/run/d2s/dev"


class _Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _sealed(frame: bytes = b"frame", clock: _Clock | None = None, key: Ed25519PrivateKey = KEY) -> bytes:
    return Signer(key, clock or _Clock()).envelope(TOPIC, [frame[:2], frame[2:]]) + frame


def _reason(v: Verifier, payload: bytes, topic: str = TOPIC, sender: str = "dev") -> str:
    with pytest.raises(AuthError) as info:
        v.open(sender, topic, payload)
    return info.value.reason


def test_signed_frame_opens_once_then_is_a_replay() -> None:
    clock = _Clock()
    v = Verifier({"dev": KEY.public_key()}, window_s=60, clock=clock)
    sealed = _sealed(b"hello world", clock)
    assert len(sealed) == ENVELOPE_BYTES + 11
    assert bytes(v.open("dev", TOPIC, sealed)) == b"hello world"
    assert _reason(v, sealed) == "replayed"


def test_forged_moved_unsigned_unknown_and_stale_are_refused_with_reasons() -> None:
    clock = _Clock()
    v = Verifier({"dev": KEY.public_key()}, window_s=60, clock=clock)
    assert _reason(v, _sealed(key=Ed25519PrivateKey.generate())) == "bad_signature"
    assert _reason(v, _sealed(), topic="fedpeft/run/d2s/other") == "bad_signature"
    assert _reason(v, _sealed(), topic="fedpeft/other-run/d2s/dev") == "bad_signature"
    tampered = bytearray(_sealed(b"payload"))
    tampered[-1] ^= 1
    assert _reason(v, bytes(tampered)) == "bad_signature"
    assert _reason(v, b"FPM1 plain frame") == "unsigned"
    assert _reason(v, _sealed(), sender="eve") == "unknown_sender"
    assert _reason(v, _sealed(clock=_Clock(1000.0 - 61))) == "stale"
    assert _reason(v, _sealed(clock=_Clock(1000.0 + 61))) == "stale"


def test_replay_memory_is_bounded_and_never_reopens_a_replay() -> None:
    clock = _Clock()
    v = Verifier({"dev": KEY.public_key()}, window_s=1e9, clock=clock, max_nonces=8)
    sent = []
    for i in range(20):
        clock.now = 1000.0 + i
        sent.append(_sealed(str(i).encode() + b"xx", clock))
        v.open("dev", TOPIC, sent[-1])
    assert len(v._seen["dev"].nonces) <= 8
    for old in sent:  # forgotten or remembered: every one is refused again
        assert _reason(v, old) == "replayed"


def test_window_expiry_frees_nonces() -> None:
    clock = _Clock()
    v = Verifier({"dev": KEY.public_key()}, window_s=10, clock=clock)
    for i in range(5):
        v.open("dev", TOPIC, _sealed(bytes([i]) * 3, clock))
    clock.now += 11
    v.open("dev", TOPIC, _sealed(b"new", clock))
    assert len(v._seen["dev"].nonces) == 1


def test_the_replay_window_survives_a_restart_through_its_journal(tmp_path: pathlib.Path) -> None:
    """fedpeft-server --resume: a frame accepted before the restart is refused after it (issue 25)."""
    key = Ed25519PrivateKey.generate()
    now = [1000.0]
    signer = Signer(key, clock=lambda: now[0])
    frame = b"frame"
    sealed = signer.envelope("t/d2s/a", [frame]) + frame
    old = signer.envelope("t/d2s/a", [b"old"]) + b"old"
    journal = tmp_path / "replay.journal"
    first = Verifier({"a": key.public_key()}, 300.0, clock=lambda: now[0], journal=journal)
    first.open("a", "t/d2s/a", sealed)
    now[0] += 400.0  # entries older than the window are compacted away on the next open
    fresh = signer.envelope("t/d2s/a", [frame]) + frame
    Verifier({"a": key.public_key()}, 300.0, clock=lambda: now[0], journal=journal).open("a", "t/d2s/a", fresh)
    now[0] += 1.0
    again = Verifier({"a": key.public_key()}, 300.0, clock=lambda: now[0], journal=journal)
    with pytest.raises(AuthError) as err:
        again.open("a", "t/d2s/a", fresh)
    assert err.value.reason == "replayed"
    assert len(journal.read_text().splitlines()) == 1 and journal.stat().st_mode & 0o077 == 0
    with pytest.raises(AuthError):
        again.open("a", "t/d2s/a", old)  # stale anyway
