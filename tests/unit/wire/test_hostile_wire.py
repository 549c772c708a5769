"""Hostile input: every malformed frame, update or chunk is refused with a CodecError naming the problem."""

from __future__ import annotations

import random
import struct

import pytest
import torch

from fedpeft_edge.errors import CodecError
from fedpeft_edge.peft.base import Manifest, TensorSpec
from fedpeft_edge.wire.chunk import Reassembler, split_payload
from fedpeft_edge.wire.codec import (
    FRAME_HEADER_BYTES,
    TENSORS_HEADER_BYTES,
    decode_message,
    decode_tensors,
    encode_message,
    encode_tensors,
)

STATE = {"a.bias": torch.randn(100), "b.weight": torch.randn(10, 10)}
MANIFEST = Manifest("bias", tuple(TensorSpec.of(k, v) for k, v in STATE.items()))


def test_random_bytes_are_refused_everywhere() -> None:
    rng = random.Random(0)
    for n in (0, 3, 20, 52, 80, 1000):
        junk = rng.randbytes(n)
        with pytest.raises(CodecError):
            decode_message(junk)
        with pytest.raises(CodecError):
            decode_tensors(junk, MANIFEST, MANIFEST.hash)
        with pytest.raises(CodecError):
            Reassembler().add(junk)


def test_truncated_frame_and_update_are_refused() -> None:
    blob = encode_tensors(STATE, MANIFEST)
    frame = encode_message({"msg_type": 3, "sender": 1, "receiver": 0}, blob)
    with pytest.raises(CodecError, match="truncated"):
        decode_message(frame[:-1])
    with pytest.raises(CodecError, match="has trailing bytes"):
        decode_message(frame + b"\x00")
    with pytest.raises(CodecError, match="truncated or padded"):
        decode_tensors(blob[:-4], MANIFEST, MANIFEST.hash)


def test_forged_manifest_hash_is_refused_before_tensor_bytes() -> None:
    blob = bytearray(encode_tensors(STATE, MANIFEST))
    blob[16] ^= 0x01  # inside the manifest hash
    with pytest.raises(CodecError, match="encoded for manifest"):
        decode_tensors(blob, MANIFEST, MANIFEST.hash)
    other = Manifest("lora", MANIFEST.tensors)
    with pytest.raises(CodecError, match="expected manifest hash"):
        decode_tensors(encode_tensors(STATE, MANIFEST), MANIFEST, other.hash)


def test_2gb_length_claims_are_refused_without_allocating() -> None:
    frame = struct.pack("<4sBBHIQ", b"FPM1", 1, 1, 0, 2, 2 * 1024**3) + b"{}"
    with pytest.raises(CodecError, match="over the"):
        decode_message(frame)
    head = bytearray(encode_tensors(STATE, MANIFEST)[:TENSORS_HEADER_BYTES])
    head[44:52] = struct.pack("<Q", 2 * 1024**3)
    with pytest.raises(CodecError, match="length is wrong"):
        decode_tensors(bytes(head), MANIFEST, MANIFEST.hash)
    chunk = bytearray(next(split_payload(b"x" * 100, 144)))
    chunk[32:40] = struct.pack("<Q", 2 * 1024**3)
    r = Reassembler(max_total_bytes=1 << 30)
    with pytest.raises(CodecError, match="claims"):
        r.add(chunk)
    assert r.pending_bytes == 0


def test_nan_tensor_is_refused_on_both_sides() -> None:
    bad = dict(STATE, **{"a.bias": STATE["a.bias"].clone()})
    bad["a.bias"][3] = float("nan")
    with pytest.raises(CodecError, match="non-finite"):
        encode_tensors(bad, MANIFEST)
    blob = bytearray(encode_tensors(STATE, MANIFEST))
    blob[TENSORS_HEADER_BYTES:TENSORS_HEADER_BYTES + 4] = struct.pack("<f", float("inf"))
    with pytest.raises(CodecError, match="non-finite"):
        decode_tensors(blob, MANIFEST, MANIFEST.hash)


def test_chunk_of_unknown_transfer_is_refused_and_reassembler_keeps_serving() -> None:
    now = [0.0]
    r = Reassembler(timeout_s=1.0, clock=lambda: now[0])
    stale = list(split_payload(b"s" * 500, 128))
    r.add(stale[0], "dev1")
    now[0] = 5.0
    with pytest.raises(CodecError, match="unknown transfer"):
        r.add(stale[1], "dev1")
    good = list(split_payload(b"g" * 500, 128))
    outs = [r.add(c, "dev1") for c in good]
    assert outs[-1] == b"g" * 500


def test_frame_header_must_be_a_json_object() -> None:
    raw = b"[1,2]"
    frame = struct.pack("<4sBBHIQ", b"FPM1", 1, 0, 0, len(raw), 0) + raw
    assert len(frame) == FRAME_HEADER_BYTES + len(raw)
    with pytest.raises(CodecError, match="JSON object"):
        decode_message(frame)
    with pytest.raises(CodecError, match="JSON-able"):
        encode_message({"x": object()})
    with pytest.raises(CodecError, match="JSON-able"):
        encode_message({"loss": float("nan")})
