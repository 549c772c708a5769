"""Chunking: payloads above the broker's limit go as numbered chunks, reassembled in any order, time-bounded.

Chunk frame (little-endian, 80-byte header): `FPC1 | ver u8 | 0 u8 | 0 u16 | transfer id (16) | index u32 |
count u32 | total_len u64 | offset u64 | sha256 of the whole payload (32) | data`.

Chunk manifest (where signing is on; each part travels as its own packet inside a signature envelope, before the
chunks it covers): `FPCM | ver u8 | 0 u8 | 0 u16 | transfer id (16) | total_len u64 | count u32 | chunk size u32 |
first u32 | n u32 | sha256 of the whole payload (32) | n x sha256 of chunks first .. first + n - 1`. A receiver
that requires manifests buffers a chunk only once a verified manifest part names its transfer, index and hash.
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

from fedpeft_edge.drops import DropReason
from fedpeft_edge.errors import AuthError, CodecError

log = logging.getLogger(__name__)

CHUNK_MAGIC = b"FPC1"
VERSION = 1
_CHUNK = struct.Struct("<4sBBH16sIIQQ32s")
CHUNK_HEADER_BYTES = _CHUNK.size
DEFAULT_MAX_TOTAL_BYTES = 2_000_000_000
_REMEMBERED = 1024  # finished/expired transfer ids kept to recognise late duplicates

MANIFEST_MAGIC = b"FPCM"
MANIFEST_VERSION = 1
_MANIFEST = struct.Struct("<4sBBH16sQIIII32s")
MANIFEST_HEADER_BYTES = _MANIFEST.size
DIGEST_BYTES = 32
MIN_CHUNK_DATA = 256  # a manifest declaring smaller chunks is refused (bounds the chunk count of a claim)

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


def _views(parts: Sequence[Buffer] | Buffer) -> list[memoryview]:
    if isinstance(parts, (bytes, bytearray, memoryview)):
        parts = [parts]
    return [memoryview(p).cast("B") for p in parts]


def _max_data(max_chunk_bytes: int) -> int:
    max_data = max_chunk_bytes - _CHUNK.size
    if max_data < 1:
        raise CodecError(
            f"max chunk size {max_chunk_bytes} leaves no room for data after the {_CHUNK.size}-byte header; "
            "raise comm_args.max_message_bytes"
        )
    return max_data


def split_payload(
    parts: Sequence[Buffer] | Buffer, max_chunk_bytes: int, transfer_id: bytes | None = None,
    digest: bytes | None = None,
) -> Iterator[bytes]:
    """Chunk frames of at most `max_chunk_bytes` each (header included) over the concatenation of `parts`.

    Each chunk is built when it is asked for, so a large payload is never copied whole. `digest` (the payload's
    SHA-256, as `manifests_for` computed it) saves hashing the payload again.
    """
    views = _views(parts)
    max_data = _max_data(max_chunk_bytes)
    total = sum(v.nbytes for v in views)
    count = chunk_count(total, max_data)
    tid = transfer_id or uuid.uuid4().bytes
    digest = digest or digest_parts(views)
    cursor = _Cursor(views)
    for index in range(count):
        offset = index * max_data
        data = cursor.take(min(max_data, total - offset))
        head = _CHUNK.pack(CHUNK_MAGIC, VERSION, 0, 0, tid, index, count, total, offset, digest)
        yield b"".join([head, *data])


@dataclasses.dataclass(frozen=True)
class ChunkManifest:
    """One part of a transfer's manifest: the transfer's shape, its payload's SHA-256, and the SHA-256 of chunks
    `first` .. `first + len(digests) - 1`. The sender signs each part; the receiver buffers only chunks a
    verified part names."""

    transfer_id: bytes
    total_len: int
    count: int
    chunk_size: int  # data bytes per chunk (the last may be shorter)
    first: int
    digests: tuple[bytes, ...]
    digest: bytes  # SHA-256 of the whole payload (the chunks' headers carry it too)

    def encode(self) -> bytes:
        head = _MANIFEST.pack(MANIFEST_MAGIC, MANIFEST_VERSION, 0, 0, self.transfer_id, self.total_len, self.count,
                              self.chunk_size, self.first, len(self.digests), self.digest)
        return b"".join([head, *self.digests])


def is_manifest(frame: Buffer) -> bool:
    """True if a (verified) frame is a chunk manifest part rather than a message."""
    return bytes(memoryview(frame)[:4]) == MANIFEST_MAGIC


def manifests_for(
    parts: Sequence[Buffer] | Buffer, max_chunk_bytes: int, part_bytes: int, transfer_id: bytes
) -> list[ChunkManifest]:
    """The manifest parts of the transfer `split_payload(parts, max_chunk_bytes, transfer_id)` makes, each at most
    `part_bytes` encoded: one pass over the payload hashes every chunk and the whole, without copying."""
    views = _views(parts)
    max_data = _max_data(max_chunk_bytes)
    per_part = (part_bytes - _MANIFEST.size) // DIGEST_BYTES
    if per_part < 1:
        raise CodecError(f"a {part_bytes}-byte packet cannot hold a chunk manifest ({_MANIFEST.size + DIGEST_BYTES} "
                         "bytes at least); raise comm_args.chunk_bytes")
    total = sum(v.nbytes for v in views)
    count = chunk_count(total, max_data)
    whole, cursor, digests = hashlib.sha256(), _Cursor(views), []
    for index in range(count):
        h = hashlib.sha256()
        for piece in cursor.take(min(max_data, total - index * max_data)):
            h.update(piece)
            whole.update(piece)
        digests.append(h.digest())
    digest = whole.digest()
    return [ChunkManifest(transfer_id, total, count, max_data, first, tuple(digests[first:first + per_part]), digest)
            for first in range(0, count, per_part)]


def parse_manifest(frame: Buffer, max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES) -> ChunkManifest:
    """A manifest part, every field checked against the others and the size limit (call it on a verified frame)."""
    view = memoryview(frame).cast("B")
    if view.nbytes < _MANIFEST.size:
        raise CodecError(f"chunk manifest of {view.nbytes} bytes is shorter than its {_MANIFEST.size}-byte header")
    magic, version, flags, reserved, tid, total, count, size, first, n, digest = _MANIFEST.unpack_from(view, 0)
    if magic != MANIFEST_MAGIC or version != MANIFEST_VERSION or flags or reserved:
        raise CodecError(f"chunk manifest {bytes(magic)!r} version {version} is not supported (this build reads "
                         f"{MANIFEST_MAGIC!r} version {MANIFEST_VERSION}); upgrade")
    if total > max_total_bytes:
        raise CodecError(f"transfer {tid.hex()} declares {total} bytes, over the {max_total_bytes}-byte limit "
                         "(comm_args.max_update_bytes, from the run's manifest); refusing it")
    if total < 1 or size < min(MIN_CHUNK_DATA, total) or count != chunk_count(total, size):
        raise CodecError(f"chunk manifest of transfer {tid.hex()} declares {count} chunks of {size} bytes for "
                         f"{total} bytes; that is not how a transfer is cut")
    if n < 1 or first + n > count or view.nbytes != _MANIFEST.size + n * DIGEST_BYTES:
        raise CodecError(f"chunk manifest of transfer {tid.hex()} covers chunks {first}..{first + n - 1} of "
                         f"{count} in {view.nbytes} bytes; malformed")
    body = bytes(view[_MANIFEST.size:])
    digests = tuple(body[i:i + DIGEST_BYTES] for i in range(0, len(body), DIGEST_BYTES))
    return ChunkManifest(bytes(tid), total, count, size, first, digests, bytes(digest))


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
    """Header and data of one chunk; every field is checked against the others and the size limit.

    Chunks of one transfer are cut at `index * size` (split_payload), so a chunk alone implies `size`: its
    own length if it is not the last, `offset / (count - 1)` if it is; `count` must then be `ceil(total /
    size)`. A frame claiming a count its length cannot produce is refused here, before any state exists.
    """
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
    if _chunk_size(index, count, total, offset, data.nbytes) is None:
        raise CodecError(
            f"chunk {index}/{count} of transfer {tid.hex()} does not fit: offset {offset} + "
            f"{data.nbytes} bytes in a {total}-byte transfer"
        )
    return ChunkHeader(bytes(tid), index, count, total, offset, bytes(digest)), data


def _chunk_size(index: int, count: int, total: int, offset: int, n: int) -> int | None:
    """The transfer's chunk data size this chunk implies, or None if its fields contradict each other."""
    if not 0 <= index < count or offset + n > total:
        return None
    if count == 1:
        return n if offset == 0 and n == total else None
    if index < count - 1:
        size = n
        ok = size > 0 and offset == index * size
    else:
        size, rem = divmod(offset, count - 1)
        ok = rem == 0 and 0 < n <= size and offset + n == total
    return size if ok and -(-total // size) == count else None


@dataclasses.dataclass
class _Transfer:
    header: ChunkHeader
    size: int  # data bytes per chunk (the last may be shorter)
    pieces: dict[int, bytes]  # chunks held until the buffer is allocated
    buf: bytearray | None  # allocated once half the claimed bytes arrived: memory follows data received
    seen: set[int]
    got_bytes: int
    held: int  # bytes of memory this transfer holds
    packets: list[int]  # MQTT packet bytes of each chunk (metering)
    started: float  # the caller's arrival time of the first chunk
    last_seen: float
    digests: dict[int, bytes] | None = None  # chunk index -> SHA-256 from verified manifest parts (None: none)
    meta: int = 0  # bytes of `held` that are manifest digests, not data


@dataclasses.dataclass(frozen=True)
class Assembled:
    """A completed transfer: the payload and what its chunks cost on the wire."""

    payload: bytearray
    packets: list[int]
    started: float


@dataclasses.dataclass(frozen=True)
class Expired:
    """A transfer freed before it completed."""

    source: str
    transfer_id: bytes
    packets: list[int]
    started: float
    freed_bytes: int
    got_chunks: int
    count: int


@dataclasses.dataclass
class _Quota:
    transfers: int = 0
    bytes: int = 0


class Reassembler:
    """Puts chunks back together in any order; frees transfers idle for longer than `timeout_s`.

    Memory is bounded and follows the data received, never the data claimed: a transfer holds its chunks
    until half its claimed length arrived, then one buffer of that length. Per sender at most
    `max_pending_transfers` transfers and `max_pending_bytes` held bytes; a sender `admit` refuses may only
    send transfers up to `unadmitted_max_bytes` (a join). Every chunk costs O(1): transfers sit in an LRU
    order, so expiry pops from its front. Not thread-safe: feed it from one thread.

    With `require_manifest`, a transfer starts only from a manifest part the caller verified (`add_manifest`):
    a chunk no verified part covers is refused before a byte of it is kept (AuthError "unsigned"), and a chunk
    whose SHA-256 differs from its part's is refused too ("bad_signature"), so a forged chunk can neither
    hold memory nor spoil the real transfer. A transfer with a manifest is checked against it either way.
    """

    def __init__(
        self,
        max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES,
        timeout_s: float = 120.0,
        max_pending_bytes: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        max_pending_transfers: int = 4,
        admit: Callable[[str], bool] | None = None,
        unadmitted_max_bytes: int = 8 * 1024 * 1024,
        require_manifest: bool = False,
    ) -> None:
        self.max_total_bytes = max_total_bytes
        self.timeout_s = timeout_s
        self.max_pending_bytes = max_pending_bytes if max_pending_bytes is not None else 2 * max_total_bytes
        self.max_pending_transfers = max_pending_transfers
        self.admit = admit
        self.unadmitted_max_bytes = unadmitted_max_bytes
        self.require_manifest = require_manifest
        self._clock = clock
        self._pending: collections.OrderedDict[tuple[str, bytes], _Transfer] = collections.OrderedDict()
        self._quota: dict[str, _Quota] = {}
        self._held = 0
        self._done: collections.OrderedDict[tuple[str, bytes], str] = collections.OrderedDict()
        self.expired: list[Expired] = []  # freed by add()'s own expiry; the caller drains it

    @property
    def pending_bytes(self) -> int:
        """Bytes of memory held for transfers not yet complete."""
        return self._held

    @property
    def pending_count(self) -> int:
        return len(self._pending)

    def add(self, chunk: Buffer, source: str = "") -> bytearray | None:
        """Take one chunk from `source`; return the whole payload when this chunk completes it, else None."""
        done = self.add_metered(chunk, source)
        return None if done is None else done.payload

    def add_metered(
        self, chunk: Buffer, source: str = "", packet_bytes: int = 0, arrived: float | None = None
    ) -> Assembled | None:
        """add() that also keeps each chunk's packet size and the first arrival, for metering."""
        self.expired.extend(self.expire())
        header, data = parse_chunk(chunk, self.max_total_bytes)
        key = (source, header.transfer_id)
        size = _chunk_size(header.index, header.count, header.total_len, header.offset, data.nbytes)
        transfer = self._pending.get(key) or self._start(key, header, size or 0, arrived)
        if transfer is None:
            return None
        if transfer.header.count != header.count or transfer.header.total_len != header.total_len \
                or transfer.header.digest != header.digest or size != transfer.size:
            text = (f"chunk {header.index} of transfer {header.transfer_id.hex()} from {source!r} disagrees with "
                    "the transfer's earlier chunks (count, length, chunk size or digest); dropping the chunk")
            if transfer.digests is not None:
                raise AuthError(text.replace("earlier chunks", "signed manifest"), DropReason.BAD_SIGNATURE)
            raise CodecError(text)
        if header.index in transfer.seen:
            return None  # QoS 1 redelivery: it never extends the transfer's life (only new data does)
        if transfer.digests is not None:
            _check_signed(transfer.digests, header, data, source)
        self._pending.move_to_end(key)
        transfer.last_seen = self._clock()
        self._store(source, transfer, header, data)
        transfer.packets.append(packet_bytes)
        if len(transfer.seen) < header.count:
            return None
        return self._finish(key, transfer)

    def add_manifest(
        self, manifest: ChunkManifest, source: str = "", packet_bytes: int = 0, arrived: float | None = None
    ) -> None:
        """Take one manifest part from `source` that the caller verified (signature, sender's role, replay): the
        transfer it names may then buffer the chunks it covers, up to the size it declares."""
        self.expired.extend(self.expire())
        key = (source, manifest.transfer_id)
        if manifest.total_len > self.max_total_bytes:
            raise CodecError(f"transfer {manifest.transfer_id.hex()} from {source!r} declares {manifest.total_len} "
                             f"bytes, over the {self.max_total_bytes}-byte limit; refusing it")
        header = ChunkHeader(manifest.transfer_id, 0, manifest.count, manifest.total_len, 0, manifest.digest)
        transfer, fresh = self._pending.get(key), False
        if transfer is None:
            transfer, fresh = self._start(key, header, manifest.chunk_size, arrived, manifest=True), True
            if transfer is None:
                return
        elif transfer.digests is None or (transfer.header.count, transfer.header.total_len, transfer.size,
                                          transfer.header.digest) != (manifest.count, manifest.total_len,
                                                                      manifest.chunk_size, manifest.digest):
            raise CodecError(f"manifest part of transfer {manifest.transfer_id.hex()} from {source!r} disagrees "
                             "with the transfer's earlier parts or chunks; dropping it")
        known = transfer.digests if transfer.digests is not None else {}  # never {} here: _start(manifest=True)
        new = {i: d for i, d in enumerate(manifest.digests, manifest.first) if i not in known}
        if not new:
            return  # a redelivered part never extends the transfer's life
        try:
            self._charge(source, transfer, DIGEST_BYTES * len(new), f"manifest part {manifest.first}")
        except CodecError:
            if fresh:
                self._release(key)
            raise
        transfer.meta += DIGEST_BYTES * len(new)
        known.update(new)
        transfer.packets.append(packet_bytes)
        self._pending.move_to_end(key)
        transfer.last_seen = self._clock()

    def _start(
        self, key: tuple[str, bytes], header: ChunkHeader, size: int, arrived: float | None, manifest: bool = False
    ) -> _Transfer | None:
        status = self._done.get(key)
        if status == "done":
            return None  # a late duplicate of a finished transfer
        if status is not None:
            raise CodecError(
                f"chunk of unknown transfer {header.transfer_id.hex()} from {key[0]!r}: it {status}; "
                "the sender must resend the whole message"
            )
        if self.require_manifest and not manifest:
            raise AuthError(
                f"chunk {header.index} of transfer {header.transfer_id.hex()} from {key[0]!r} has no verified "
                "manifest (signed chunk manifests are required where comm_args.require_signatures is on; a sender "
                "that predates them must be upgraded); refused before buffering", DropReason.UNSIGNED)
        source = key[0]
        if self.admit is not None and header.total_len > self.unadmitted_max_bytes and not self.admit(source):
            raise CodecError(
                f"transfer {header.transfer_id.hex()} of {header.total_len} bytes from {source!r}, a sender not "
                f"admitted to the run (only {self.unadmitted_max_bytes} bytes until it joins); refusing it"
            )
        quota = self._quota.setdefault(source, _Quota())
        if quota.transfers >= self.max_pending_transfers:
            raise CodecError(
                f"{source!r} already has {quota.transfers} transfers pending (comm_args.max_pending_transfers); "
                f"refusing transfer {header.transfer_id.hex()}"
            )
        now = self._clock()
        transfer = _Transfer(header, size, {}, None, set(), 0, 0, [], now if arrived is None else arrived, now,
                             {} if manifest else None)
        self._pending[key] = transfer
        quota.transfers += 1
        return transfer

    def _store(self, source: str, transfer: _Transfer, header: ChunkHeader, data: memoryview) -> None:
        total = header.total_len
        grow = data.nbytes if transfer.buf is None else 0
        if transfer.buf is None and 2 * (transfer.got_bytes + data.nbytes) >= total:
            grow = total - (transfer.held - transfer.meta)  # switch to one buffer: the data proved half the claim
        switch = transfer.buf is None and grow != data.nbytes
        self._charge(source, transfer, grow, f"chunk {header.index}")
        if switch:
            buf = bytearray(total)
            for index, piece in transfer.pieces.items():
                buf[index * transfer.size:index * transfer.size + len(piece)] = piece
            transfer.pieces.clear()
            transfer.buf = buf
        if transfer.buf is None:
            transfer.pieces[header.index] = bytes(data)
        else:
            transfer.buf[header.offset:header.offset + data.nbytes] = data
        transfer.seen.add(header.index)
        transfer.got_bytes += data.nbytes

    def _charge(self, source: str, transfer: _Transfer, grow: int, what: str) -> None:
        """Count `grow` more bytes against `source`'s quota, or refuse them (nothing is kept then)."""
        quota = self._quota[source]
        if quota.bytes + grow > self.max_pending_bytes:
            raise CodecError(
                f"{source!r} would hold {quota.bytes + grow} bytes of pending transfers, over the "
                f"{self.max_pending_bytes}-byte limit; dropping {what} of {transfer.header.transfer_id.hex()}"
            )
        transfer.held += grow
        quota.bytes += grow
        self._held += grow

    def _release(self, key: tuple[str, bytes]) -> _Transfer:
        transfer = self._pending.pop(key)
        quota = self._quota[key[0]]
        quota.transfers -= 1
        quota.bytes -= transfer.held
        self._held -= transfer.held
        if quota.transfers == 0:
            del self._quota[key[0]]
        return transfer

    def _finish(self, key: tuple[str, bytes], transfer: _Transfer) -> Assembled:
        self._release(key)
        buf = transfer.buf if transfer.buf is not None else bytearray(b"".join(
            transfer.pieces[i] for i in range(transfer.header.count)))
        # a transfer under a manifest had every chunk's SHA-256 checked on arrival: no second pass over the payload
        if transfer.got_bytes != transfer.header.total_len or (transfer.digests is None and hashlib.sha256(
                buf).digest() != transfer.header.digest):
            self._remember(key, "failed its digest check")
            raise CodecError(
                f"transfer {transfer.header.transfer_id.hex()} from {key[0]!r} failed its SHA-256 check "
                f"({transfer.got_bytes} of {transfer.header.total_len} bytes); the payload was corrupted"
            )
        self._remember(key, "done")
        return Assembled(buf, transfer.packets, transfer.started)

    def expire(self) -> list[Expired]:
        """Free transfers idle for longer than `timeout_s` (oldest first, O(1) each); return them."""
        now = self._clock()
        out: list[Expired] = []
        while self._pending:
            key, t = next(iter(self._pending.items()))
            if now - t.last_seen <= self.timeout_s:
                break
            self._release(key)
            log.warning(
                "transfer %s from %r expired after %.1f s idle with %d/%d chunks; freed %d bytes",
                key[1].hex(), key[0], now - t.last_seen, len(t.seen), t.header.count, t.held,
            )
            self._remember(key, f"expired after {self.timeout_s:g} s")
            out.append(Expired(key[0], key[1], t.packets, t.started, t.held, len(t.seen), t.header.count))
        return out

    def _remember(self, key: tuple[str, bytes], status: str) -> None:
        self._done[key] = status
        while len(self._done) > _REMEMBERED:
            self._done.popitem(last=False)


def _check_signed(digests: dict[int, bytes], header: ChunkHeader, data: memoryview, source: str) -> None:
    """A chunk of a transfer under a manifest: its verified part must name it and its SHA-256 must match."""
    want = digests.get(header.index)
    if want is None:
        raise AuthError(f"chunk {header.index} of transfer {header.transfer_id.hex()} from {source!r} is not covered "
                        "by any verified manifest part; refused before buffering", DropReason.UNSIGNED)
    if hashlib.sha256(data).digest() != want:
        raise AuthError(f"chunk {header.index} of transfer {header.transfer_id.hex()} from {source!r} does not match "
                        "the SHA-256 its signed manifest names (forged or corrupted); dropped",
                        DropReason.BAD_SIGNATURE)
