"""Property-based fuzzing (hypothesis) of the frame, chunk, tensor and envelope decoders: whatever the bytes,
the only exception is one of the project's own (FedPeftError), and memory follows the data received.

8,600 generated inputs here; tests/unit/transport/test_fuzz_receive.py adds 1,500 at the transport edge.
"""

from __future__ import annotations

import contextlib
import json
import struct
from typing import Any

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedpeft_edge.errors import FedPeftError
from fedpeft_edge.peft.base import Manifest, TensorSpec
from fedpeft_edge.wire.auth import Signer, Verifier
from fedpeft_edge.wire.chunk import CHUNK_HEADER_BYTES, Reassembler, parse_chunk, split_payload
from fedpeft_edge.wire.codec import TENSORS_HEADER_BYTES, decode_message, decode_tensors, encode_tensors

STATE = {"a.bias": torch.randn(16), "b.weight": torch.randn(4, 4), "c.scale": torch.randn(3).half()}
MANIFEST = Manifest("bias", tuple(TensorSpec.of(k, v) for k, v in STATE.items()))
BLOBS = [bytes(encode_tensors(STATE, MANIFEST, "fp32")), bytes(encode_tensors(STATE, MANIFEST, "int8_row"))]
FUZZ = settings(deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


def _frame(header: bytes, blob: bytes = b"", flags: int = 0, header_len: int | None = None,
           blob_len: int | None = None) -> bytes:
    hl = len(header) if header_len is None else header_len
    bl = len(blob) if blob_len is None else blob_len
    return struct.pack("<4sBBHIQ", b"FPM1", 1, flags, 0, hl, bl) + header + blob


def _refused_or_ok(fn: Any, *args: Any) -> None:
    with contextlib.suppress(FedPeftError):
        fn(*args)


@settings(FUZZ, max_examples=3000)
@given(st.binary(max_size=300))
def test_random_bytes_never_raise_foreign_errors(data: bytes) -> None:
    _refused_or_ok(decode_message, data)
    _refused_or_ok(parse_chunk, data)
    _refused_or_ok(decode_tensors, data, MANIFEST, MANIFEST.hash)
    _refused_or_ok(Reassembler(max_total_bytes=1 << 20).add, data, "x")


@settings(FUZZ, max_examples=1500)
@given(st.one_of(
    json_values.map(lambda v: json.dumps(v, allow_nan=True).encode()),
    st.integers(1, 3000).map(lambda n: b"[" * n + b"]" * n),
    st.integers(1, 3000).map(lambda n: b'{"a":' * n + b"1" + b"}" * n),
    st.sampled_from([b'{"x": NaN}', b'{"x": -Infinity}', b'{"x": 1e999}', b'{"x": ' + b"9" * 5000 + b"}",
                     b'{"msg_type": [1]}', b"\xff\xfe", b'{"a": "\\ud800"}']),
), st.integers(0, 3), st.binary(max_size=16))
def test_frame_headers_of_any_shape(header: bytes, flags: int, blob: bytes) -> None:
    try:
        params, _ = decode_message(_frame(header, blob, flags))
    except FedPeftError:
        return
    assert isinstance(params, dict)
    json.dumps(params, allow_nan=False)  # what was accepted is finite, shallow JSON


@settings(FUZZ, max_examples=2000)
@given(st.binary(min_size=16, max_size=16), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1),
       st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1), st.binary(max_size=64))
def test_chunk_claims_cost_only_what_arrived(tid: bytes, index: int, count: int, total: int, offset: int,
                                             data: bytes) -> None:
    chunk = struct.pack("<4sBBH16sIIQQ32s", b"FPC1", 1, 0, 0, tid, index, count, total, offset, b"\0" * 32) + data
    r = Reassembler(max_total_bytes=1 << 40, max_pending_transfers=2)
    with contextlib.suppress(FedPeftError):
        r.add(chunk, "attacker")
    assert r.pending_bytes <= len(data)  # never the claimed total


@settings(FUZZ, max_examples=1500)
@given(st.binary(max_size=200), st.integers(0, 300), st.integers(0, 255))
def test_tensor_blobs_mutated_anywhere(tail: bytes, cut: int, flip: int) -> None:
    blob = BLOBS[flip % 2]
    pos = cut % len(blob)
    mutated = [bytes(blob[:pos]) + tail, bytes(blob[:pos]) + bytes([flip]) + bytes(blob[pos + 1:])]
    if pos < TENSORS_HEADER_BYTES:
        mutated.append(bytes(blob[:TENSORS_HEADER_BYTES]) + tail)
    for m in mutated:
        try:
            out = decode_tensors(m, MANIFEST, MANIFEST.hash)
        except FedPeftError:
            continue
        assert [t.shape for t in out.values()] == [STATE[k].shape for k in out]


KEY = Ed25519PrivateKey.generate()
OTHER = Ed25519PrivateKey.generate()


@settings(FUZZ, max_examples=600)
@given(st.binary(max_size=200), st.integers(0, 300), st.integers(1, 255), st.booleans())
def test_envelopes_forged_anywhere_are_refused(frame: bytes, pos: int, flip: int, other_key: bool) -> None:
    topic = "fedpeft/r/d2s/dev"
    sealed = Signer(OTHER if other_key else KEY).envelope(topic, [frame]) + frame
    v = Verifier({"dev": KEY.public_key()})
    if other_key:
        with pytest.raises(FedPeftError, match="does not verify"):
            v.open("dev", topic, sealed)
        return
    with pytest.raises(FedPeftError, match="does not verify"):
        v.open("dev", topic.replace("dev", "eve"), sealed)  # moved to another topic
    assert bytes(v.open("dev", topic, sealed)) == frame
    with pytest.raises(FedPeftError, match="replay"):
        v.open("dev", topic, sealed)
    mutated = bytearray(sealed)
    mutated[pos % len(mutated)] ^= flip
    with pytest.raises(FedPeftError):
        Verifier({"dev": KEY.public_key()}).open("dev", topic, bytes(mutated))


def test_valid_round_trip_still_decodes() -> None:
    chunks = list(split_payload(b"p" * 1000, CHUNK_HEADER_BYTES + 100))
    r = Reassembler()
    assert [r.add(c) for c in chunks][-1] == b"p" * 1000
