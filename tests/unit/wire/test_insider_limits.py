"""Admission derived from the run (issue 25): header bounds before parsing, the manifest's exact update size as
the receive limit, duplicate chunks that never extend a transfer's life, a per-sender packet rate."""

from __future__ import annotations

import json
import struct
import time

import pytest

from fedpeft_edge.config import CommArgs
from fedpeft_edge.errors import CodecError
from fedpeft_edge.peft.base import Manifest, TensorSpec
from fedpeft_edge.wire.auth import SenderRate
from fedpeft_edge.wire.chunk import Reassembler, split_payload
from fedpeft_edge.wire.codec import (
    MAX_HEADER_BYTES,
    MAX_HEADER_CONTAINERS,
    decode_message,
    encode_message,
    encode_update,
    encoded_nbytes,
)
from fedpeft_edge.wire.limits import largest_message_bytes, receive_limits

MANIFEST = Manifest("bias", (TensorSpec("a.bias", (1000,), "float32"), TensorSpec("h.weight", (10, 30), "float32")))


def _frame_with_header(header: bytes) -> bytes:
    return struct.pack("<4sBBHIQ", b"FPM1", 1, 0, 0, len(header), 0) + header


def test_a_header_of_many_containers_is_refused_before_parsing_and_fast() -> None:
    flood = b"[" + b"{}," * (MAX_HEADER_BYTES // 3 - 2) + b"{}]"
    assert len(flood) <= MAX_HEADER_BYTES
    t0 = time.process_time()
    for _ in range(20):
        with pytest.raises(CodecError, match="JSON containers"):
            decode_message(_frame_with_header(flood))
    assert time.process_time() - t0 < 1.0  # 4 MiB of these cost ~2 s each before the bound
    ok = {"type": "x", "profile": {"cpu": [1, 2, 3]}, "l": [[1]] * (MAX_HEADER_CONTAINERS // 2 - 4)}
    params, _ = decode_message(encode_message(ok))
    assert params == json.loads(json.dumps(ok))


def test_a_header_over_the_size_bound_is_refused_by_its_length_alone() -> None:
    with pytest.raises(CodecError, match="claims"):
        decode_message(struct.pack("<4sBBHIQ", b"FPM1", 1, 0, 0, MAX_HEADER_BYTES + 1, 0))
    with pytest.raises(CodecError, match="over"):
        encode_message({"x": "a" * MAX_HEADER_BYTES})


def test_the_manifest_fixes_the_update_size_and_the_receive_limits() -> None:
    import torch

    state = {s.name: torch.zeros(s.shape) for s in MANIFEST.tensors}
    for enc in ("fp32", "fp16", "int8_row"):
        assert len(bytes(encode_update(state, MANIFEST, enc))) == encoded_nbytes(MANIFEST, enc)
    assert encoded_nbytes(MANIFEST) == encoded_nbytes(MANIFEST, "fp32")
    comm = receive_limits(CommArgs(), MANIFEST)
    assert comm.max_update_bytes == encoded_nbytes(MANIFEST) < 10_000  # not 2 GB
    assert comm.sender_burst >= 64
    assert largest_message_bytes(MANIFEST) < MAX_HEADER_BYTES + 10_000
    assert receive_limits(CommArgs(max_update_bytes=100, sender_burst=7), MANIFEST).sender_burst == 7
    assert receive_limits(CommArgs(max_update_bytes=100), MANIFEST).max_update_bytes == 100


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_duplicate_chunks_never_extend_a_transfers_life() -> None:
    clock = _Clock()
    r = Reassembler(timeout_s=10.0, clock=clock)
    chunks = list(split_payload(b"x" * 5000, 1024))
    r.add(chunks[0], "eve")
    for _ in range(2):
        clock.now += 4.0
        r.add(chunks[0], "eve")  # a redelivered chunk every 4 s: no new data
    clock.now = 10.5
    r.expire()
    assert r.pending_count == 0  # expired 10 s after its last new chunk, duplicates or not
    clock.now += 1
    with pytest.raises(CodecError, match="expired"):
        r.add(chunks[1], "eve")


def test_the_sender_rate_is_a_token_bucket_per_sender() -> None:
    clock = _Clock()
    rate = SenderRate(2.0, 3, clock=clock, max_senders=2)
    assert [rate.allow("eve") for _ in range(4)] == [True, True, True, False]
    assert rate.allow("dev")  # another sender's bucket
    clock.now += 1.0
    assert [rate.allow("eve") for _ in range(3)] == [True, True, False]
    rate.allow("x")  # a third sender: the least recent is forgotten (memory bound)
    assert len(rate._buckets) == 2
