"""The transport's metering layer: each message a link sent or received, as one `TransferRecord` on the node's
`metering.bandwidth.BandwidthMeter` (the bytes that were encoded and crossed, never derived from a size)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fedpeft_edge.metering.bandwidth import BandwidthMeter, TransferRecord
from fedpeft_edge.protocol import keys as M
from fedpeft_edge.transport.framing import is_scalar, round_of


class LinkMeter:
    """One node's records: the server's sends go "down" and its receipts "up", a device's the other way."""

    def __init__(self, meter: BandwidthMeter, is_server: bool) -> None:
        self.meter = meter
        self.is_server = is_server
        self.received_count = 0  # records of received messages so far (the receive pipeline meters each once)

    def sent(self, peer: str, params: Mapping[str, Any], sizes: Sequence[int], payload: int, start: float,
             end: float) -> TransferRecord:
        """Record a message sent in packets of `sizes` bytes (`payload`: the framed bytes they carried)."""
        rec = TransferRecord(
            direction="down" if self.is_server else "up", sent=True, peer=peer, round=round_of(params),
            msg_type=params.get(M.MSG_ARG_KEY_TYPE), msg_id=params[M.MSG_ARG_KEY_MSG_ID], chunks=len(sizes),
            mqtt_bytes=sum(sizes), payload_bytes=payload, chunk_bytes=tuple(sizes), start=start, end=end,
        )
        self.meter.record(rec)
        return rec

    def received(self, peer: str, params: Mapping[str, Any], sizes: Sequence[int], start: float, end: float,
                 payload: int) -> None:
        """Record a message (or what of it arrived before it was dropped: `params` empty, msg_type "dropped")
        received in packets of `sizes` bytes; a type or id that is not a scalar is not believed."""
        msg_type = params.get(M.MSG_ARG_KEY_TYPE, "dropped")
        msg_id = params.get(M.MSG_ARG_KEY_MSG_ID)
        self.received_count += 1
        self.meter.record(TransferRecord(
            direction="up" if self.is_server else "down", sent=False, peer=peer, round=round_of(params),
            msg_type=msg_type if is_scalar(msg_type) else "dropped", msg_id=msg_id if is_scalar(msg_id) else None,
            chunks=len(sizes), mqtt_bytes=sum(sizes), payload_bytes=payload, chunk_bytes=tuple(sizes),
            start=start, end=end,
        ))
