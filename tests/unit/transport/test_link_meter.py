"""The metering layer alone: a sent or received message is one TransferRecord in the node's direction, with the
bytes of its packets; a type or id that is not a scalar is not believed."""

from __future__ import annotations

from fedpeft_edge.metering.bandwidth import BandwidthMeter
from fedpeft_edge.transport.metering import LinkMeter


def test_sent_and_received_records_carry_the_packets_and_the_direction() -> None:
    meter = BandwidthMeter()
    server, device = LinkMeter(meter, is_server=True), LinkMeter(meter, is_server=False)
    params = {"msg_type": 2, "msg_id": "a", "round_idx": 4}
    rec = server.sent("dev-a", params, [1000, 1000, 52], 2000, 1.0, 2.0)
    assert (rec.direction, rec.sent, rec.chunks, rec.mqtt_bytes, rec.payload_bytes, rec.chunk_bytes, rec.round) \
        == ("down", True, 3, 2052, 2000, (1000, 1000, 52), 4)
    device.received("0", params, [1000, 1000, 52], 1.0, 2.5, 2000)
    got = meter.transfers()[-1]
    assert (got.direction, got.sent, got.peer, got.msg_type, got.msg_id, got.end) == ("down", False, "0", 2, "a", 2.5)
    assert meter.transfers() == [rec, got]


def test_a_dropped_or_strange_message_is_metered_as_dropped() -> None:
    meter = BandwidthMeter()
    link = LinkMeter(meter, is_server=True)
    link.received("dev-a", {}, [70], 1.0, 1.0, 50)
    link.received("dev-a", {"msg_type": [1], "msg_id": {"x": 1}, "round_idx": True}, [70], 1.0, 1.0, 50)
    assert [(r.direction, r.msg_type, r.msg_id, r.round) for r in meter.transfers()] == \
        [("up", "dropped", None, None)] * 2
