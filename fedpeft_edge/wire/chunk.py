"""Chunking: payloads above the broker's limit go as numbered chunks, reassembled in any order, time-bounded.

Chunk frame (little-endian, 80-byte header): `FPC1 | ver u8 | 0 u8 | 0 u16 | transfer id (16) | index u32 |
count u32 | total_len u64 | offset u64 | sha256 of the whole payload (32) | data`.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import logging
import math
import struct
import time
import uuid
from collections.abc import Callable, Iterator, Sequence

from fedpeft_edge.errors import CodecError

log = logging.getLogger(__name__)

CHUNK_MAGIC = b"FPC1"
VERSION = 1
_CHUNK = struct.Struct("<4sBBH16sIIQQ32s")
CHUNK_HEADER_BYTES = _CHUNK.size
DEFAULT_MAX_TOTAL_BYTES = 2_000_000_000
_REMEMBERED = 1024  # finished/expired transfer ids kept to recognise late duplicates

Buffer = bytes | bytearray | memoryview


@dataclasses.dataclass(frozen=True)
class ChunkHeader:
    """The parsed header of one chunk."""

    transfer_id: bytes
    index: int
    count: int
    total_len: int
    offset: int
    digest: bytes


def is_chunk(payload: Buffer) -> bool:
    """True if the payload starts like a chunk frame (a whole message starts otherwise)."""
    return bytes(memoryview(payload)[:4]) == CHUNK_MAGIC


def chunk_count(total_len: int, max_data: int) -> int:
    """How many chunks `split_payload` makes of `total_len` bytes with `max_data` data bytes per chunk."""
    return max(1, math.ceil(total_len / max_data))


def digest_parts(parts: Sequence[Buffer]) -> bytes:
    """SHA-256 over the concatenation of parts (no join)."""
    h = hashlib.sha256()
    for p in parts:
        h.update(p)
    return h.digest()


def split_payload(
    parts: Sequence[Buffer] | Buffer, max_chunk_bytes: int, transfer_id: bytes | None = None
) -> Iterator[bytes]:
    """Chunk frames of at most `max_chunk_bytes` each (header included) over the concatenation of `parts`.

    Each chunk is built when it is asked for, so a large payload is never copied whole.
    """
    if isinstance(parts, (bytes, bytearray, memoryview)):
        parts = [parts]
    views = [memoryview(p).cast("B") for p in parts]
    max_data = max_chunk_bytes - _CHUNK.size
    if max_data < 1:
        raise CodecError(
            f"max chunk size {max_chunk_bytes} leaves no room for data after the {_CHUNK.size}-byte header; "
            "raise comm_args.max_message_bytes"
        )
    total = sum(v.nbytes for v in views)
    count = chunk_count(total, max_data)
    tid = transfer_id or uuid.uuid4().bytes
    digest = digest_parts(views)
    cursor = _Cursor(views)
    for index in range(count):
        offset = index * max_data
        data = cursor.take(min(max_data, total - offset))
        head = _CHUNK.pack(CHUNK_MAGIC, VERSION, 0, 0, tid, index, count, total, offset, digest)
        yield b"".join([head, *data])


class _Cursor:
    """Walks a list of buffers, handing out consecutive slices without copying."""

    def __init__(self, views: list[memoryview]) -> None:
        self._views = views
        self._i = 0
        self._pos = 0

    def take(self, n: int) -> list[memoryview]:
        out: list[memoryview] = []
        while n > 0:
            v = self._views[self._i]
            k = min(n, v.nbytes - self._pos)
            out.append(v[self._pos:self._pos + k])
            n -= k
            self._pos += k
            if self._pos == v.nbytes:
                self._i += 1
                self._pos = 0
        return out


def parse_chunk(
    chunk: Buffer, max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES
) -> tuple[ChunkHeader, memoryview]:
    """Header and data of one chunk; every field is checked against the others and the size limit."""
    view = memoryview(chunk).cast("B")
    if view.nbytes < _CHUNK.size:
        raise CodecError(f"chunk of {view.nbytes} bytes is shorter than its {_CHUNK.size}-byte header")
    magic, version, _f, _r, tid, index, count, total, offset, digest = _CHUNK.unpack_from(view, 0)
    if magic != CHUNK_MAGIC:
        raise CodecError(f"not a chunk (magic {bytes(magic)!r}, expected {CHUNK_MAGIC!r})")
    if version != VERSION:
        raise CodecError(f"chunk version {version} is not supported (this build reads {VERSION}); upgrade")
    if total > max_total_bytes:
        raise CodecError(
            f"transfer {tid.hex()} claims {total} bytes, over the {max_total_bytes}-byte limit "
            "(comm_args.max_update_bytes); refusing it"
        )
    data = view[_CHUNK.size:]
    if not (0 < count <= max(1, total) and index < count and offset + data.nbytes <= total):
        raise CodecError(
            f"chunk {index}/{count} of transfer {tid.hex()} does not fit: offset {offset} + "
            f"{data.nbytes} bytes in a {total}-byte transfer"
        )
    return ChunkHeader(bytes(tid), index, count, total, offset, bytes(digest)), data


@dataclasses.dataclass
class _Transfer:
    header: ChunkHeader
    buf: bytearray
    seen: bytearray  # one flag per chunk index
    got_chunks: int
    got_bytes: int
    started: float
    last_seen: float


class Reassembler:
    """Puts chunks back together in any order; frees transfers idle for longer than `timeout_s`.

    Memory is bounded: one transfer at most `max_total_bytes`, all pending ones together at most
    `max_pending_bytes`. Not thread-safe: feed it from one thread (the transport's receive loop).
    """

    def __init__(
        self,
        max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES,
        timeout_s: float = 120.0,
        max_pending_bytes: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_total_bytes = max_total_bytes
        self.timeout_s = timeout_s
        self.max_pending_bytes = max_pending_bytes if max_pending_bytes is not None else 2 * max_total_bytes
        self._clock = clock
        self._pending: dict[tuple[str, bytes], _Transfer] = {}
        self._done: collections.OrderedDict[tuple[str, bytes], str] = collections.OrderedDict()

    @property
    def pending_bytes(self) -> int:
        """Bytes held for transfers not yet complete."""
        return sum(len(t.buf) for t in self._pending.values())

    @property
    def pending_count(self) -> int:
        return len(self._pending)

    def add(self, chunk: Buffer, source: str = "") -> bytearray | None:
        """Take one chunk from `source`; return the whole payload when this chunk completes it, else None."""
        self.expire()
        header, data = parse_chunk(chunk, self.max_total_bytes)
        key = (source, header.transfer_id)
        transfer = self._pending.get(key) or self._start(key, header)
        if transfer is None:
            return None
        if transfer.header.count != header.count or transfer.header.total_len != header.total_len \
                or transfer.header.digest != header.digest:
            raise CodecError(
                f"chunk {header.index} of transfer {header.transfer_id.hex()} from {source!r} disagrees with "
                "the transfer's earlier chunks (count, length or digest); dropping the chunk"
            )
        if transfer.seen[header.index]:
            return None  # QoS 1 redelivery
        transfer.buf[header.offset:header.offset + data.nbytes] = data
        transfer.seen[header.index] = 1
        transfer.got_chunks += 1
        transfer.got_bytes += data.nbytes
        transfer.last_seen = self._clock()
        if transfer.got_chunks < header.count:
            return None
        return self._finish(key, transfer)

    def _start(self, key: tuple[str, bytes], header: ChunkHeader) -> _Transfer | None:
        status = self._done.get(key)
        if status == "done":
            return None  # a late duplicate of a finished transfer
        if status is not None:
            raise CodecError(
                f"chunk of unknown transfer {header.transfer_id.hex()} from {key[0]!r}: it {status}; "
                "the sender must resend the whole message"
            )
        if self.pending_bytes + header.total_len > self.max_pending_bytes:
            raise CodecError(
                f"transfer {header.transfer_id.hex()} of {header.total_len} bytes would exceed the "
                f"{self.max_pending_bytes} bytes allowed for pending transfers; refusing it"
            )
        now = self._clock()
        transfer = _Transfer(header, bytearray(header.total_len), bytearray(header.count), 0, 0, now, now)
        self._pending[key] = transfer
        return transfer

    def _finish(self, key: tuple[str, bytes], transfer: _Transfer) -> bytearray:
        del self._pending[key]
        if transfer.got_bytes != transfer.header.total_len or hashlib.sha256(transfer.buf).digest() \
                != transfer.header.digest:
            self._remember(key, "failed its digest check")
            raise CodecError(
                f"transfer {transfer.header.transfer_id.hex()} from {key[0]!r} failed its SHA-256 check "
                f"({transfer.got_bytes} of {transfer.header.total_len} bytes); the payload was corrupted"
            )
        self._remember(key, "done")
        return transfer.buf

    def expire(self) -> list[bytes]:
        """Free transfers idle for longer than `timeout_s`; return their ids."""
        now = self._clock()
        stale = [k for k, t in self._pending.items() if now - t.last_seen > self.timeout_s]
        for key in stale:
            t = self._pending.pop(key)
            log.warning(
                "transfer %s from %r expired after %.1f s idle with %d/%d chunks; freed %d bytes",
                key[1].hex(), key[0], now - t.last_seen, t.got_chunks, t.header.count, len(t.buf),
            )
            self._remember(key, f"expired after {self.timeout_s:g} s")
        return [k[1] for k in stale]

    def _remember(self, key: tuple[str, bytes], status: str) -> None:
        self._done[key] = status
        while len(self._done) > _REMEMBERED:
            self._done.popitem(last=False)
