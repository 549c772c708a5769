"""Bandwidth planning: measured update sizes, packet splitting as the transport does it, link parsing."""

from __future__ import annotations

import math

import pytest

from fedpeft_edge.config import CommArgs, ModelArgs, PeftArgs
from fedpeft_edge.errors import ConfigError
from fedpeft_edge.planning import link_bytes, measure_updates, packet_sizes, parse_link, round_seconds
from fedpeft_edge.wire.chunk import CHUNK_HEADER_BYTES
from fedpeft_edge.wire.packet import publish_packet_bytes

TINY = ModelArgs(model="vit_tiny_patch16_224", num_classes=10, weights="none",
                 model_kwargs={"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2})


def test_sizes_follow_the_encoding_and_the_manifest() -> None:
    fp32, fp16, int8 = measure_updates(TINY, PeftArgs(method="bias"), CommArgs(), ["fp32", "fp16", "int8"])
    assert fp32.raw_bytes == 4 * fp32.params
    assert fp32.blob_bytes - fp32.raw_bytes < 100  # the blob header only
    assert fp32.frame_bytes < fp32.mqtt_bytes < fp32.frame_bytes + 100
    assert fp16.blob_bytes < 0.55 * fp32.blob_bytes and int8.blob_bytes < 0.3 * fp32.blob_bytes
    assert fp32.packets == 1


def test_chunked_packets_sum_to_frame_plus_headers() -> None:
    comm = CommArgs(max_message_bytes=4096)
    sizes = packet_sizes("fedpeft/r/d2s/device-0", 100_000, comm)
    assert len(sizes) > 1 and max(sizes) <= 4096 + 5
    # per packet: PUBLISH header with a 2-byte remaining length (payloads of 128..16383 bytes) + chunk header
    overhead = publish_packet_bytes("fedpeft/r/d2s/device-0", 1000, 1, True) - 1000 + CHUNK_HEADER_BYTES
    assert sum(sizes) == 100_000 + len(sizes) * overhead


@pytest.mark.parametrize(("spec", "down", "up"), [("lte", 30e6, 10e6), ("10mbit", 1e7, 1e7),
                                                   ("50mbit/10mbit", 5e7, 1e7), ("1gbit", 1e9, 1e9)])
def test_parse_link(spec: str, down: float, up: float) -> None:
    link = parse_link(spec)
    assert (link.down_bps, link.up_bps) == (down, up)


def test_links_carry_a_round_trip_time() -> None:
    assert parse_link("lte").rtt_s == pytest.approx(0.05) and parse_link("10mbit").rtt_s == 0.0
    assert parse_link("lte@80ms").rtt_s == pytest.approx(0.08)
    link = parse_link("50mbit/10mbit@0.2s")
    assert (link.down_bps, link.up_bps, link.rtt_s) == (5e7, 1e7, pytest.approx(0.2))
    assert "30 Mbit/s down, 10 Mbit/s up, 50 ms round trip" in parse_link("lte").describe()
    with pytest.raises(ConfigError, match="round-trip"):
        parse_link("lte@fast")


@pytest.mark.parametrize("spec", ["fast", "10", "-5mbit", "1mbit/2mbit/3mbit"])
def test_bad_links_name_the_fix(spec: str) -> None:
    with pytest.raises(ConfigError, match="link"):
        parse_link(spec)


def test_round_seconds() -> None:
    (size,) = measure_updates(TINY, PeftArgs(method="head"), CommArgs(), ["fp32"])
    framed = size.mqtt_bytes + math.ceil(size.mqtt_bytes / 1448) * 66  # TCP/IP/Ethernet headers per segment
    assert round_seconds(size, 8e6, 8e6) == pytest.approx(2 * framed / 1e6)
    assert round_seconds(size, 8e6, 4e6) == pytest.approx(3 * framed / 1e6)
    assert round_seconds(size, 8e6, 8e6, rtt_s=0.1) == pytest.approx(2 * framed / 1e6 + 0.2)  # a trip each way


def test_link_bytes_add_tcp_ip_framing() -> None:
    assert link_bytes(1448) == 1514 and link_bytes(1449) == 1449 + 2 * 66
    assert link_bytes(13_535_000) / 13_535_000 == pytest.approx(1514 / 1448, rel=1e-4)
