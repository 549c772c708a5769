"""Receive limits derived from the run: the manifest fixes an update's exact encoded size, so a node bounds
what it accepts (largest update, reassembly bytes per sender, packet rate per sender) by it, not by a
configured gigabyte maximum (docs/security.md)."""

from __future__ import annotations

import dataclasses

from fedpeft_edge.config import CommArgs
from fedpeft_edge.wire.auth import ENVELOPE_BYTES
from fedpeft_edge.wire.chunk import CHUNK_HEADER_BYTES, chunk_count
from fedpeft_edge.wire.codec import FRAME_HEADER_BYTES, MAX_HEADER_BYTES, ManifestLike, encoded_nbytes


def largest_message_bytes(manifest: ManifestLike) -> int:
    """The largest payload a node of this run may receive: an update or model in its largest encoding, its
    frame and JSON header, and the signature envelope."""
    return encoded_nbytes(manifest) + FRAME_HEADER_BYTES + MAX_HEADER_BYTES + ENVELOPE_BYTES


def receive_limits(comm_args: CommArgs, manifest: ManifestLike) -> CommArgs:
    """comm_args with max_update_bytes lowered to the manifest's largest encoded update (the transport sizes
    its reassembly quota per sender and its largest message from it) and, unless set, sender_burst derived
    from the chunks of the largest message."""
    blob = encoded_nbytes(manifest)
    changes: dict[str, int] = {"max_update_bytes": min(comm_args.max_update_bytes, blob)}
    if not comm_args.sender_burst:
        changes["sender_burst"] = sender_burst_for(comm_args, largest_message_bytes(manifest))
    return dataclasses.replace(comm_args, **changes)  # type: ignore[arg-type]


def sender_burst_for(comm_args: CommArgs, largest_bytes: int) -> int:
    """Packets one sender may send at once before its rate applies: the chunks of four of its largest messages,
    plus 64 small ones (so a whole update always gets through a token bucket that starts full)."""
    data = min(comm_args.chunk_bytes or comm_args.max_message_bytes, comm_args.max_message_bytes)
    return 4 * chunk_count(largest_bytes, max(1, data - CHUNK_HEADER_BYTES - 64)) + 64
