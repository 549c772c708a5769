"""The transport's chunking layer: a framed message out as packets under the link's limit (behind a signed
manifest where this node signs), and inbound chunks back into whole payloads (`wire.chunk.Reassembler`), with
what it refuses or frees unfinished metered and recorded as drops.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from fedpeft_edge.config import CommArgs
from fedpeft_edge.drops import DroppedMessage, DropReason
from fedpeft_edge.errors import AuthError, CodecError
from fedpeft_edge.transport.inbox import Inbound
from fedpeft_edge.transport.metering import LinkMeter
from fedpeft_edge.transport.signing import Signing
from fedpeft_edge.wire.auth import ENVELOPE_BYTES, is_sealed
from fedpeft_edge.wire.chunk import (
    CHUNK_HEADER_BYTES,
    DIGEST_BYTES,
    MIN_CHUNK_DATA,
    Expired,
    Reassembler,
    chunk_count,
    is_chunk,
    is_manifest,
    manifests_for,
    parse_manifest,
    split_payload,
)
from fedpeft_edge.wire.codec import MAX_HEADER_BYTES
from fedpeft_edge.wire.packet import max_chunk_bytes, publish_packet_bytes
from fedpeft_edge.wire.seal import MAX_WRAPS_BYTES, SEAL_OVERHEAD

Buffer = bytes | bytearray | memoryview


@dataclasses.dataclass
class Outgoing:
    """One message being sent: its packets (made as they are published), sizes, and acknowledgements."""

    topic: str
    peer: str
    params: dict[str, Any]
    total: int  # payload bytes
    count: int  # packets
    packets: Iterator[bytes]
    sizes: list[int] = dataclasses.field(default_factory=list)
    acked: int = 0
    start: float = 0.0
    end: float = 0.0


def outgoing(topic: str, peer: str, params: dict[str, Any], parts: Sequence[Buffer], limit: int, qos: int,
             mqtt5: bool, signing: Signing) -> Outgoing:
    """The packets of a framed (and signed) message: itself if it fits `limit`, else its chunks; where this node
    signs, the chunks' manifest goes first, each part in its own signature envelope, so a receiver verifies who
    sends what (size, count, each chunk's SHA-256) before it buffers a byte of it."""
    total = sum(memoryview(p).nbytes for p in parts)
    if publish_packet_bytes(topic, total, qos, mqtt5) <= limit:
        return Outgoing(topic, peer, params, total, 1, iter([b"".join(parts)]))
    max_chunk = max_chunk_bytes(topic, limit, qos, mqtt5)
    count = chunk_count(total, max_chunk - CHUNK_HEADER_BYTES)
    if signing.signer is None:
        return Outgoing(topic, peer, params, total, count, split_payload(parts, max_chunk))
    tid = uuid.uuid4().bytes
    manifests = manifests_for(parts, max_chunk, max_chunk - ENVELOPE_BYTES, tid)
    heads = signing.seal_manifests(topic, manifests)
    chunks = split_payload(parts, max_chunk, tid, manifests[0].digest)
    return Outgoing(topic, peer, params, total, len(heads) + count, itertools.chain(heads, chunks))


def build_reassembler(comm_args: CommArgs, sealed: bool) -> Reassembler:
    """A reassembler bounded by the largest message comm_args lets in (`sealed`: blobs carry the encryption's
    header, tag and the shared model's wrapped keys); where signatures are required, a chunk is buffered only
    under a verified signed manifest (its digests count against the sender's quota too: 32 bytes a chunk)."""
    most = comm_args.max_update_bytes + MAX_HEADER_BYTES + ENVELOPE_BYTES + 4096
    if sealed:
        most += SEAL_OVERHEAD + MAX_WRAPS_BYTES
    return Reassembler(
        most, comm_args.chunk_timeout_s,
        max_pending_bytes=most + MAX_HEADER_BYTES + DIGEST_BYTES * chunk_count(most, MIN_CHUNK_DATA),
        max_pending_transfers=comm_args.max_pending_transfers,
        unadmitted_max_bytes=MAX_HEADER_BYTES + ENVELOPE_BYTES + 4096,
        require_manifest=comm_args.require_signatures,
    )


class Reassembly:
    """Inbound packets -> whole payloads: a plain packet passes, a chunk is buffered until its transfer is whole,
    a signed manifest part is verified before the transfer it declares may hold memory. A chunk or manifest the
    reassembler refuses, and a transfer it frees unfinished, is metered and recorded as a drop here; an AuthError
    (no verified manifest, a wrong digest, a bad signature) is raised for the caller to record."""

    def __init__(self, reassembler: Reassembler, signing: Signing, meter: LinkMeter,
                 drops: Callable[[DroppedMessage], None]) -> None:
        self.reassembler, self.signing, self.meter, self.drops = reassembler, signing, meter, drops

    def assemble(self, node: str, item: Inbound) -> tuple[Buffer | None, list[int], float]:
        """(payload, its packets' sizes, when its first packet came), or (None, [], 0.0) while incomplete."""
        if is_sealed(item.payload) and is_manifest(memoryview(item.payload)[ENVELOPE_BYTES:]):
            self._add_manifest(node, item)
            return None, [], 0.0
        if not is_chunk(item.payload):
            return item.payload, [item.packet_bytes], item.arrived
        self.signing.check_chunk_sender(node)
        try:
            done = self.reassembler.add_metered(item.payload, node, item.packet_bytes, item.arrived)
        except AuthError:
            raise  # no verified manifest covers it, or it differs from its signed hash: the caller drops it
        except CodecError as exc:
            self._refuse(node, item, exc)
            return None, [], 0.0
        finally:
            self._drain()
        if done is None:
            return None, [], 0.0
        return done.payload, done.packets, done.started

    def _add_manifest(self, node: str, item: Inbound) -> None:
        """A signed chunk manifest part: verified with the key of the sender its topic names (the role: the server
        on a device's down-link and the model topic, that device on its up-link) and against replay before the
        transfer it declares may hold any memory; AuthError / CodecError otherwise (recorded by the caller)."""
        frame = self.signing.open(node, item.topic, item.payload)
        manifest = parse_manifest(frame, self.reassembler.max_total_bytes)
        try:
            self.reassembler.add_manifest(manifest, node, item.packet_bytes, item.arrived)
        except CodecError as exc:
            self._refuse(node, item, exc)
        finally:
            self._drain()

    def _refuse(self, node: str, item: Inbound, exc: CodecError) -> None:
        self.meter.received(node, {}, [item.packet_bytes], item.arrived, item.arrived, len(item.payload))
        self.drops(DroppedMessage(node, item.topic, DropReason.CHUNK_REFUSED, str(exc), len(item.payload)))

    def _drain(self) -> None:
        self.report_expired(self.reassembler.expired)
        self.reassembler.expired = []

    def expire(self) -> None:
        """Free the transfers stale for comm_args.chunk_timeout_s (the receive loop calls it when idle)."""
        self.report_expired(self.reassembler.expire())

    def report_expired(self, expired: list[Expired]) -> None:
        """Meter and report transfers the reassembler freed before they completed."""
        now = time.time()
        for e in expired:
            self.meter.received(e.source, {}, e.packets, e.started, now, 0)
            self.drops(DroppedMessage(
                e.source, "", DropReason.TRANSFER_EXPIRED, f"transfer {e.transfer_id.hex()} expired with "
                f"{e.got_chunks}/{e.count} chunks; freed {e.freed_bytes} bytes", sum(e.packets)))
