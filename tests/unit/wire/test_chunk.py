"""Chunking: split and reassemble in any order, duplicates ignored, stale transfers freed, sizes bounded."""

from __future__ import annotations

import random

import pytest

from fedpeft_edge.errors import CodecError
from fedpeft_edge.wire.chunk import CHUNK_HEADER_BYTES, Reassembler, is_chunk, parse_chunk, split_payload


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_split_respects_the_limit_and_reassembles_in_any_order() -> None:
    payload = random.Random(0).randbytes(100_003)
    chunks = list(split_payload([payload[:10], memoryview(payload)[10:]], 4096))
    assert all(len(c) <= 4096 and is_chunk(c) for c in chunks)
    assert len(chunks) == -(-len(payload) // (4096 - CHUNK_HEADER_BYTES))
    random.Random(1).shuffle(chunks)
    r = Reassembler(max_total_bytes=1 << 20)
    results = [r.add(c, "dev1") for c in chunks]
    assert all(x is None for x in results[:-1])
    assert results[-1] == payload and r.pending_count == 0


def test_duplicates_are_ignored_and_late_duplicates_of_done_transfers_too() -> None:
    payload = b"x" * 10_000
    chunks = list(split_payload(payload, 1024))
    r = Reassembler()
    assert r.add(chunks[0]) is None and r.add(chunks[0]) is None
    out = None
    for c in chunks[1:]:
        out = r.add(c) or out
    assert out == payload
    assert r.add(chunks[3]) is None  # QoS 1 redelivery after completion


def test_stale_transfer_is_freed_and_its_late_chunk_refused() -> None:
    clock = _Clock()
    chunks = list(split_payload(b"y" * 5000, 1024))
    r = Reassembler(timeout_s=10.0, clock=clock)
    r.add(chunks[0], "dev2")
    assert r.pending_bytes == 1024 - CHUNK_HEADER_BYTES  # memory follows the data received
    clock.now = 11.0
    assert len(r.expire()) == 1 and r.pending_bytes == 0
    with pytest.raises(CodecError, match="unknown transfer .* expired"):
        r.add(chunks[1], "dev2")


def test_same_transfer_id_from_two_sources_stays_apart() -> None:
    tid = b"\x01" * 16
    a, b = b"a" * 3000, b"b" * 3000
    ca, cb = list(split_payload(a, 1024, tid)), list(split_payload(b, 1024, tid))
    r = Reassembler()
    outs = [r.add(x, "dev1") for x in ca[:-1]] + [r.add(y, "dev2") for y in cb]
    assert outs[-1] == b and r.add(ca[-1], "dev1") == a


def test_corrupted_chunk_fails_the_digest() -> None:
    chunks = [bytearray(c) for c in split_payload(b"z" * 3000, 1024)]
    chunks[1][-1] ^= 0xFF
    r = Reassembler()
    with pytest.raises(CodecError, match="SHA-256"):
        for c in chunks:
            r.add(c)


def test_parse_chunk_bounds() -> None:
    chunk = next(split_payload(b"q" * 100, CHUNK_HEADER_BYTES + 64))
    header, data = parse_chunk(chunk)
    assert header.total_len == 100 and header.count == 2 and len(data) == 64
    with pytest.raises(CodecError, match="limit"):
        parse_chunk(chunk, max_total_bytes=99)
    with pytest.raises(CodecError, match="no room"):
        next(split_payload(b"q", CHUNK_HEADER_BYTES))
