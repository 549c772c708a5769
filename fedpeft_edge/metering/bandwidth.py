"""Bytes at the wire: every MQTT PUBLISH a node sends or receives, per message, peer, direction and round."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Sequence
from typing import Any, Literal

PUBACK_BYTES = 4  # an MQTT PUBACK: fixed header + packet id (MQTT 5 omits reason code 0 with no properties)

Direction = Literal["up", "down"]  # up: device -> server; down: server -> device


@dataclasses.dataclass(frozen=True)
class TransferRecord:
    """One message as it crossed the wire, whole or in chunks."""

    direction: Direction
    sent: bool  # True if this node sent it
    peer: str  # the other node
    round: int | None
    msg_type: Any
    msg_id: str | None
    chunks: int  # PUBLISH packets (1 when not chunked)
    mqtt_bytes: int  # all PUBLISH packets, headers included
    payload_bytes: int  # the message frame (before chunk headers)
    chunk_bytes: tuple[int, ...]  # size of every PUBLISH packet
    start: float  # time.time() of the first byte sent / first chunk received
    end: float  # time.time() of the last PUBACK / last chunk received

    @property
    def duration_s(self) -> float:
        return self.end - self.start

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["chunk_bytes"] = list(self.chunk_bytes)
        d["duration_s"] = self.duration_s
        return d


class BandwidthMeter:
    """Thread-safe record of every message's MQTT bytes; `totals` sums them per round and peer.

    Records are indexed by round and by (round, peer), so the server's per-message lookups cost O(records of
    that device in that round), not O(all records): at 1000 devices per round that is the difference.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_round: dict[int | None, list[TransferRecord]] = {}
        self._by_round_peer: dict[tuple[int | None, str], list[TransferRecord]] = {}
        self._acks = {"sent": 0, "received": 0}

    def record(self, rec: TransferRecord) -> None:
        with self._lock:
            self._by_round.setdefault(rec.round, []).append(rec)
            self._by_round_peer.setdefault((rec.round, rec.peer), []).append(rec)

    def record_ack(self, sent: bool, count: int = 1) -> None:
        """Count PUBACK packets (control traffic, kept apart from message bytes)."""
        with self._lock:
            self._acks["sent" if sent else "received"] += count

    def transfers(self, round: int | None = None, peer: str | int | None = None) -> list[TransferRecord]:
        """Records matching the round and peer (None = any); indexed when the round is given."""
        with self._lock:
            if round is not None and peer is not None:
                return list(self._by_round_peer.get((round, str(peer)), ()))
            if round is not None:
                return list(self._by_round.get(round, ()))
            recs = [r for rs in self._by_round.values() for r in rs]
        return [r for r in recs if peer is None or r.peer == str(peer)]

    def totals(self, round: int | None = None, peer: str | int | None = None) -> dict[str, int]:
        """bytes_up, bytes_down, messages_up, messages_down, packets for the round and peer (None = all)."""
        return _sum(self.transfers(round, peer))

    def per_peer(self, round: int | None = None) -> dict[str, dict[str, int]]:
        """totals() for every peer seen."""
        by_peer: dict[str, list[TransferRecord]] = {}
        for r in self.transfers(round):
            by_peer.setdefault(r.peer, []).append(r)
        return {p: _sum(rs) for p, rs in sorted(by_peer.items())}

    def forget(self, up_to_round: int) -> None:
        """Drop the records of rounds <= up_to_round (already written to the run log), so memory stays flat."""
        with self._lock:
            for rnd in [r for r in self._by_round if r is not None and r <= up_to_round]:
                del self._by_round[rnd]
            for key in [k for k in self._by_round_peer if k[0] is not None and k[0] <= up_to_round]:
                del self._by_round_peer[key]

    def control_bytes(self) -> dict[str, int]:
        """PUBACK bytes sent and received."""
        with self._lock:
            return {k: v * PUBACK_BYTES for k, v in self._acks.items()}


def _sum(recs: Sequence[TransferRecord]) -> dict[str, int]:
    out = {"bytes_up": 0, "bytes_down": 0, "messages_up": 0, "messages_down": 0, "packets": 0}
    for r in recs:
        out[f"bytes_{r.direction}"] += r.mqtt_bytes
        out[f"messages_{r.direction}"] += 1
        out["packets"] += r.chunks
    return out


def transfer_seconds(records: Sequence[TransferRecord], sent_at: float | None) -> float | None:
    """Seconds from the peer's send time (`sent_at`, its wall clock) to the last byte received here.

    On one machine this is exact; across machines it assumes clocks kept in step (NTP). Without `sent_at`
    (or with a clock behind ours) it falls back to first-to-last chunk received, which is 0 for one packet.
    """
    received = [r for r in records if not r.sent]
    if not received:
        return None
    end = max(r.end for r in received)
    if isinstance(sent_at, (int, float)) and end >= sent_at:
        return end - float(sent_at)
    return max(r.duration_s for r in received)
