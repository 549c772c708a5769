"""Bounded reassembly: per-sender transfer and byte limits, admission, memory that follows data received,
chunk counts checked against lengths, expiry that frees and reports."""

from __future__ import annotations

import struct

import pytest

from fedpeft_edge.errors import CodecError
from fedpeft_edge.wire.chunk import CHUNK_HEADER_BYTES, Reassembler, parse_chunk, split_payload


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_per_sender_transfer_limit_leaves_other_senders_alone() -> None:
    r = Reassembler(max_pending_transfers=2)
    firsts = [next(split_payload(b"a" * 5000, 1024)) for _ in range(3)]
    r.add(firsts[0], "eve")
    r.add(firsts[1], "eve")
    with pytest.raises(CodecError, match="already has 2 transfers pending"):
        r.add(firsts[2], "eve")
    good = list(split_payload(b"g" * 5000, 1024))
    assert [r.add(c, "dev") for c in good][-1] == b"g" * 5000


def test_memory_follows_data_received_not_claimed() -> None:
    r = Reassembler(max_total_bytes=1 << 40)
    chunks = list(split_payload(b"z" * 100_000, 1024))
    r.add(chunks[0], "dev")
    assert r.pending_bytes == 1024 - CHUNK_HEADER_BYTES
    for c in chunks[1:60]:
        r.add(c, "dev")
    assert r.pending_bytes > 100_000 * 0.5  # past half the claim: one buffer of the claimed length
    assert [r.add(c, "dev") for c in chunks[60:]][-1] == b"z" * 100_000
    assert r.pending_bytes == 0


def test_per_sender_byte_limit() -> None:
    r = Reassembler(max_pending_bytes=3000)
    chunks = list(split_payload(b"q" * 20_000, 1024))
    with pytest.raises(CodecError, match="over the 3000-byte limit"):
        for c in chunks:
            r.add(c, "eve")
    assert r.pending_bytes <= 3000


def test_unadmitted_senders_may_send_only_join_sized_transfers() -> None:
    r = Reassembler(admit=lambda s: s == "dev", unadmitted_max_bytes=4000)
    big = list(split_payload(b"b" * 10_000, 1024))
    with pytest.raises(CodecError, match="not admitted"):
        r.add(big[0], "eve")
    small = list(split_payload(b"s" * 3000, 1024))
    assert [r.add(c, "eve") for c in small][-1] == b"s" * 3000
    assert [r.add(c, "dev") for c in big][-1] == b"b" * 10_000


def test_count_must_match_the_length() -> None:
    chunk = bytearray(next(split_payload(b"x" * 500, CHUNK_HEADER_BYTES + 100)))
    parse_chunk(bytes(chunk))
    struct.pack_into("<I", chunk, 28, 2_000_000)  # claims 2M chunks of 100 bytes for 500 bytes
    with pytest.raises(CodecError, match="does not fit"):
        parse_chunk(bytes(chunk))
    struct.pack_into("<I", chunk, 28, 3)  # too few chunks for the length
    with pytest.raises(CodecError, match="does not fit"):
        parse_chunk(bytes(chunk))


def test_expiry_frees_reports_and_unblocks_the_sender() -> None:
    clock = _Clock()
    r = Reassembler(timeout_s=5, clock=clock, max_pending_transfers=1)
    r.add(next(split_payload(b"e" * 5000, 1024)), "eve")
    clock.now = 6.0
    fresh = list(split_payload(b"f" * 3000, 1024))
    r.add(fresh[0], "eve")  # expiry runs first: eve's old transfer is freed, the new one fits
    assert len(r.expired) == 1 and r.expired[0].source == "eve" and r.expired[0].got_chunks == 1
    assert [r.add(c, "eve") for c in fresh[1:]][-1] == b"f" * 3000
