"""The lab relay on loopback: latency each way, loss stalls, order and bytes kept, outages, the byte log."""

from __future__ import annotations

import asyncio
import json
import random
import time
from pathlib import Path

from fedpeft_edge.config import LinkProfile
from fedpeft_edge.lab.relay import SEGMENT_BYTES, ByteLog, DelayModel, Relay


async def _echo_server() -> tuple[asyncio.Server, int]:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def _through_relay(profile: LinkProfile, payload: bytes, log: Path | None = None,
                         cut_s: float = 0.0) -> tuple[bytes, float, Relay]:
    server, port = await _echo_server()
    relay = Relay(profile, ("127.0.0.1", 0), ("127.0.0.1", port), ByteLog(log), seed=1)
    _, rport = await relay.start()
    reader, writer = await asyncio.open_connection("127.0.0.1", rport)
    if cut_s:
        relay.cut_for(cut_s)
    t0 = time.perf_counter()
    writer.write(payload)
    await writer.drain()
    got = await reader.readexactly(len(payload))
    elapsed = time.perf_counter() - t0
    writer.close()
    await relay.close()
    server.close()
    return got, elapsed, relay


def test_latency_is_added_in_each_direction() -> None:
    _, base, _ = asyncio.run(_through_relay(LinkProfile(), b"ping"))
    _, slow, _ = asyncio.run(_through_relay(LinkProfile(latency_ms=100), b"ping"))
    # 100 ms out, 100 ms back, one after the other: at least 0.2 s end to end. The relay's own overhead (base)
    # overlaps those waits, so it is not added to the lower bound (it was: 0.2016 - 0.0050 failed on a busy day).
    assert slow >= 0.2 and slow - base < 0.35, (base, slow)


def test_bytes_arrive_whole_and_in_order_and_are_logged(tmp_path: Path) -> None:
    payload = random.Random(0).randbytes(3_000_000)
    log = tmp_path / "relay.jsonl"
    got, _, relay = asyncio.run(_through_relay(LinkProfile(latency_ms=5, jitter_ms=5, loss=0.01), payload, log))
    assert got == payload
    assert relay.bytes.totals == {"up": len(payload), "down": len(payload)}
    bins = [json.loads(line) for line in log.read_text().splitlines()]
    assert sum(b["up"] for b in bins) == len(payload) and sum(b["down"] for b in bins) == len(payload)


def test_an_outage_holds_traffic_until_the_link_returns(tmp_path: Path) -> None:
    log = tmp_path / "relay.jsonl"
    got, elapsed, _ = asyncio.run(_through_relay(LinkProfile(), b"hello", log, cut_s=0.4))
    assert got == b"hello"
    assert elapsed >= 0.39
    events = [json.loads(line)["event"] for line in log.read_text().splitlines() if "event" in line]
    assert events == ["cut", "restore"]


def test_loss_stalls_the_share_of_chunks_the_probability_gives() -> None:
    model = DelayModel(LinkProfile(latency_ms=10, loss=0.2, rto_ms=200), random.Random(3))
    releases = [model.release_at(float(i), SEGMENT_BYTES) - i for i in range(2000)]  # 1 s apart: no queueing
    stalled = sum(1 for d in releases if d > 0.15)
    assert 0.17 < stalled / 2000 < 0.23
    assert all(abs(d - 0.01) < 1e-9 or abs(d - 0.21) < 1e-9 for d in releases)


def test_loss_grows_with_the_segments_a_chunk_holds() -> None:
    model = DelayModel(LinkProfile(loss=0.01, rto_ms=100), random.Random(5))
    big = sum(model.release_at(float(i), 100 * SEGMENT_BYTES) - i > 0.05 for i in range(3000)) / 3000
    assert abs(big - (1 - 0.99 ** 100)) < 0.04  # ~63% of 100-segment chunks lose a segment


def test_jitter_stays_within_bounds_and_keeps_order() -> None:
    model = DelayModel(LinkProfile(latency_ms=50, jitter_ms=20), random.Random(7))
    t = [i * 0.001 for i in range(1000)]
    rel = [model.release_at(x, 100) for x in t]
    assert rel == sorted(rel)  # a TCP stream's bytes never overtake each other
    assert all(0.03 - 1e-9 <= r - x <= 0.07 + 1e-9 for r, x in zip(rel, t, strict=True))


def test_relay_bins_group_into_transfers_without_stray_messages() -> None:
    from fedpeft_edge.lab.report import transfers

    bins = [{"t": 10.0, "down": 40}]  # a small message just before the update
    bins += [{"t": round(10.2 + 0.05 * i, 2), "down": 6250} for i in range(40)]  # 250 kB over 2 s
    bins += [{"t": 20.0, "down": 100_000}, {"t": 12.5, "up": 500}]
    got = transfers(bins, gap_s=0.3)
    down = sorted((b for b in got if b.direction == "down"), key=lambda b: b.start)
    assert [b.nbytes for b in down] == [250_040, 100_000]
    assert abs(down[0].seconds - 2.0) < 0.11 and down[0].start >= 10.2
    assert [b.nbytes for b in got if b.direction == "up"] == [500]
