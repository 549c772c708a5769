"""BandwidthMeter: exact PUBLISH sizes and totals per round, peer and direction."""

from __future__ import annotations

from fedpeft_edge.metering.bandwidth import BandwidthMeter, TransferRecord
from fedpeft_edge.wire.packet import publish_packet_bytes, varint_len


def test_publish_packet_bytes_matches_the_mqtt_layout() -> None:
    # 1 fixed byte + varint(remaining) + 2 + topic + 2 (packet id) + payload [+ 1 empty properties]
    assert publish_packet_bytes("a/b", 10, qos=1, mqtt5=False) == 1 + 1 + 2 + 3 + 2 + 10
    assert publish_packet_bytes("a/b", 10, qos=0, mqtt5=True) == 1 + 1 + 2 + 3 + 1 + 10
    assert publish_packet_bytes("t", 200, qos=1, mqtt5=True) == 1 + 2 + 2 + 1 + 2 + 1 + 200
    assert [varint_len(n) for n in (0, 127, 128, 16383, 16384, 2097152, 268435455)] == [1, 1, 2, 2, 3, 4, 4]


def _rec(direction: str, peer: str, rnd: int | None, nbytes: int, chunks: int = 1) -> TransferRecord:
    return TransferRecord(direction, direction == "down", peer, rnd, 2, None, chunks, nbytes,  # type: ignore[arg-type]
                          nbytes - 10, (nbytes,), 0.0, 1.0)


def test_totals_by_round_and_peer() -> None:
    m = BandwidthMeter()
    m.record(_rec("down", "1", 1, 100))
    m.record(_rec("up", "1", 1, 50, chunks=3))
    m.record(_rec("up", "2", 2, 70))
    expected = {"bytes_up": 120, "bytes_down": 100, "messages_up": 2, "messages_down": 1, "packets": 5}
    assert m.totals() == expected
    assert m.totals(round=1)["bytes_up"] == 50
    assert m.totals(peer=2)["bytes_up"] == 70
    assert set(m.per_peer()) == {"1", "2"}
    m.record_ack(sent=True, count=3)
    assert m.control_bytes() == {"sent": 12, "received": 0}
