"""Chunk manifests: a receiver that requires them buffers a chunk only once a verified manifest part names its
transfer, index and SHA-256, bounded by the size the manifest declares (issue 25)."""

from __future__ import annotations

import random

import pytest

from fedpeft_edge.errors import AuthError, CodecError
from fedpeft_edge.wire.chunk import (
    CHUNK_HEADER_BYTES,
    ChunkManifest,
    Reassembler,
    is_manifest,
    manifests_for,
    parse_manifest,
    split_payload,
)

TID = b"\x07" * 16


def _transfer(payload: bytes, chunk: int = 1024, part: int = 4096) -> tuple[list[ChunkManifest], list[bytes]]:
    return manifests_for(payload, chunk, part, TID), list(split_payload(payload, chunk, TID))


def _reason(call: object, *args: object) -> str:
    with pytest.raises(AuthError) as info:
        call(*args)  # type: ignore[operator]
    return info.value.reason


def test_signed_transfer_reassembles_in_any_order_and_parts_round_trip() -> None:
    payload = random.Random(0).randbytes(50_001)
    parts, chunks = _transfer(payload, part=600)  # 600-byte parts hold 16 digests: 4 parts for 50 chunks
    assert len(parts) == 4 and sum(len(p.digests) for p in parts) == len(chunks) == parts[0].count
    encoded = [p.encode() for p in parts]
    assert all(is_manifest(e) and len(e) <= 600 for e in encoded)
    assert [parse_manifest(e) for e in encoded] == parts
    r = Reassembler(require_manifest=True)
    for p in parts:
        r.add_manifest(p, "0")
    random.Random(1).shuffle(chunks)
    out = [r.add(c, "0") for c in chunks]
    assert out[-1] == payload and all(x is None for x in out[:-1]) and r.pending_bytes == 0


def test_chunks_without_a_verified_manifest_are_refused_before_buffering() -> None:
    r = Reassembler(require_manifest=True)
    for i in range(50):  # an insider's flood: transfers claiming 1 GB each, never a signed manifest
        chunk = next(split_payload(b"\0" * 4096, 1024, i.to_bytes(16, "little")))
        assert _reason(r.add, chunk, "0") == "unsigned"
    assert r.pending_bytes == 0 and r.pending_count == 0
    # a transfer whose manifest names another sender is no cover either
    parts, chunks = _transfer(b"x" * 5000)
    r.add_manifest(parts[0], "dev-a")
    assert _reason(r.add, chunks[0], "dev-b") == "unsigned"


def test_a_forged_chunk_is_dropped_and_the_real_one_still_completes_the_transfer() -> None:
    payload = random.Random(2).randbytes(5000)
    parts, chunks = _transfer(payload)
    r = Reassembler(require_manifest=True)
    r.add_manifest(parts[0], "0")
    forged = bytearray(chunks[2])
    forged[-1] ^= 0xFF
    assert _reason(r.add, bytes(forged), "0") == "bad_signature"
    held = r.pending_bytes
    assert held == 32 * len(chunks)  # only the verified digests are held; the forged chunk kept nothing
    out = None
    for c in chunks:
        out = r.add(c, "0") or out
    assert out == payload


def test_a_chunk_disagreeing_with_the_manifest_shape_is_bad_signature() -> None:
    parts, _ = _transfer(b"a" * 5000)
    r = Reassembler(require_manifest=True)
    r.add_manifest(parts[0], "0")
    other = next(split_payload(b"a" * 9000, 1024, TID))  # same transfer id, another total length
    assert _reason(r.add, other, "0") == "bad_signature"
    assert r.pending_bytes == 32 * parts[0].count


def test_a_chunk_beyond_the_parts_received_waits_for_its_part() -> None:
    payload = b"m" * 20_000
    parts, chunks = _transfer(payload, part=400)  # 10 digests a part
    r = Reassembler(require_manifest=True)
    r.add_manifest(parts[0], "0")
    assert _reason(r.add, chunks[15], "0") == "unsigned"
    r.add_manifest(parts[1], "0")
    r.add_manifest(parts[1], "0")  # a redelivered part is charged once
    assert r.pending_bytes == 32 * 20
    assert r.add(chunks[15], "0") is None


def test_the_declared_size_is_bounded_by_the_receive_limit_and_by_the_quota() -> None:
    parts, _ = _transfer(b"b" * 100_000)
    r = Reassembler(max_total_bytes=50_000, require_manifest=True)
    with pytest.raises(CodecError, match="over the 50000-byte limit"):
        r.add_manifest(parts[0], "0")
    with pytest.raises(CodecError, match="over the 50000-byte limit"):
        parse_manifest(parts[0].encode(), 50_000)
    tight = Reassembler(max_pending_bytes=100, require_manifest=True)
    with pytest.raises(CodecError, match="pending transfers"):
        tight.add_manifest(parts[0], "0")
    assert tight.pending_count == 0  # a refused first part leaves no transfer behind


def test_malformed_manifests_are_refused() -> None:
    good = _transfer(b"c" * 5000)[0][0]
    enc = good.encode()
    for bad in (enc[:40], enc[:-1], b"FPCX" + enc[4:],
                ChunkManifest(TID, 5000, 3, good.chunk_size, 0, good.digests, good.digest).encode(),
                ChunkManifest(TID, 10**9, 10**9, 1, 0, good.digests[:1], good.digest).encode(),
                ChunkManifest(TID, 5000, good.count, good.chunk_size, good.count - 1, good.digests[:2],
                              good.digest).encode()):
        with pytest.raises(CodecError):
            parse_manifest(bad)


def test_without_require_manifest_plain_chunks_still_reassemble() -> None:
    payload = b"p" * 3000
    r = Reassembler()
    out = None
    for c in split_payload(payload, CHUNK_HEADER_BYTES + 500):
        out = r.add(c, "dev") or out
    assert out == payload
