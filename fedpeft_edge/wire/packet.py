"""MQTT packet arithmetic, in one place: PUBLISH sizes, the packet limit, the largest chunk that fits.

The transport uses it to chunk and meter what it sends, metering and planning to predict what it will send.
"""

from __future__ import annotations

MQTT_MAX_PACKET = 268_435_455 + 5  # MQTT's remaining-length limit + the fixed header
_VARINT_GROWTH = 3  # a chunk's remaining length may take up to 3 more varint bytes than an empty packet's


def varint_len(n: int) -> int:
    """Bytes MQTT's variable-length integer takes for n (1..4)."""
    size = 1
    while n >= 128:
        n //= 128
        size += 1
    return size


def publish_packet_bytes(
    topic: str, payload_len: int, qos: int, mqtt5: bool, properties_bytes: int | None = None
) -> int:
    """Exact size of a PUBLISH packet: fixed header, topic, packet id, properties, payload.

    `properties_bytes` is the MQTT 5 properties field with its length prefix (1 when there are none).
    """
    remaining = 2 + len(topic.encode("utf-8")) + payload_len + (2 if qos > 0 else 0)
    if mqtt5:
        remaining += 1 if properties_bytes is None else properties_bytes
    return 1 + varint_len(remaining) + remaining


def packet_limit(max_message_bytes: int, broker_max_packet: int | None = None, chunk_bytes: int = 0) -> int:
    """Largest PUBLISH packet a node sends: comm_args.max_message_bytes, or less if the broker said so or
    comm_args.chunk_bytes (0: no such cap) asks for smaller chunks; a message above it goes in chunks."""
    limit = min(max_message_bytes + 5, MQTT_MAX_PACKET)
    if chunk_bytes:
        limit = min(limit, chunk_bytes)
    if broker_max_packet:
        limit = min(limit, int(broker_max_packet))
    return limit


def max_chunk_bytes(topic: str, limit: int, qos: int, mqtt5: bool) -> int:
    """Largest payload (chunk header included) one PUBLISH packet on `topic` may carry under `limit`."""
    return limit - publish_packet_bytes(topic, 0, qos, mqtt5) - _VARINT_GROWTH
