"""The per-device link relay: a TCP relay that adds latency, jitter, loss stalls and outages (no netem here).

The agent connects to the relay on its namespace's loopback; the relay connects on to the broker across the
device's veth, which tc shapes to the link's rates. Each direction is a FIFO of chunks, each released at
`read time + latency (+/- jitter)` and never before the chunk ahead of it, so delay is pipelined like a real
link's (it does not cost latency per chunk). A TCP stream cannot lose bytes, so `loss` becomes what loss costs
TCP: each segment (1448 bytes) is lost with probability `loss`, and a chunk holding a lost segment is held back
an extra `rto_ms` (head-of-line blocking). An outage ("cut") freezes both directions of every connection and
holds new connections unconnected; when it ends, what was held flows again as TCP's retransmissions would
(connections the agent gave up on are closed then; those it abandoned before they reached the broker vanish).

Every 0.05 s the relay appends the bytes it moved per direction to a JSON-lines log, counted when the relay
hands them on: "down" bytes as they reach the agent (after the shaped link and the delay), "up" bytes as they
enter the shaped link (after the delay; the kernel's send buffer is bounded, so this follows the shaped rate).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import logging
import random
import socket
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from fedpeft_edge.config import LinkProfile

log = logging.getLogger(__name__)

SEGMENT_BYTES = 1448  # TCP payload of a 1500-byte Ethernet frame with timestamps
READ_BYTES = 65536
WRITE_BYTES = 8192
MAX_QUEUED_BYTES = 32 * 1024 * 1024  # per direction; reading pauses above it (backpressure)
BIN_S = 0.05
# Socket buffers of the relay's link side (the kernel doubles them): enough for 100 Mbit/s on the lab's sub-ms
# veth round trip; the send buffer small so "up" bytes are counted within 32 kB of leaving on the link.
LINK_SEND_BUFFER = 16384
LINK_RECEIVE_BUFFER = 32768


@dataclasses.dataclass
class _Chunk:
    release_at: float
    data: bytes  # b"" marks the sender's close


class DelayModel:
    """When a chunk read now may leave: latency, jitter and loss stalls, order kept."""

    def __init__(self, profile: LinkProfile, rng: random.Random) -> None:
        self.profile = profile
        self.rng = rng
        self._last = 0.0

    def release_at(self, now: float, nbytes: int) -> float:
        p = self.profile
        delay = p.latency_ms / 1000.0
        if p.jitter_ms:
            delay += self.rng.uniform(-p.jitter_ms, p.jitter_ms) / 1000.0
        if p.loss and nbytes:
            segments = -(-nbytes // SEGMENT_BYTES)
            if self.rng.random() < 1.0 - (1.0 - p.loss) ** segments:
                delay += p.rto_ms / 1000.0
        self._last = max(self._last, now + max(0.0, delay))
        return self._last


class ByteLog:
    """Bytes moved per direction in 0.1 s bins, appended to a JSON-lines file (or kept in memory)."""

    def __init__(self, path: Path | None) -> None:
        self._fh: TextIO | None = path.open("a", encoding="utf-8") if path else None
        self._bin: int | None = None
        self._counts = {"up": 0, "down": 0}
        self.totals = {"up": 0, "down": 0}

    def add(self, direction: str, nbytes: int, now: float | None = None) -> None:
        now = time.time() if now is None else now
        b = int(now / BIN_S)
        if self._bin is not None and b != self._bin:
            self.flush()
        self._bin = b
        self._counts[direction] += nbytes
        self.totals[direction] += nbytes

    def event(self, name: str, **fields: Any) -> None:
        self.flush()
        self._write({"t": time.time(), "event": name, **fields})

    def flush(self) -> None:
        if self._bin is not None and any(self._counts.values()):
            self._write({"t": round(self._bin * BIN_S, 3), **self._counts})
        self._counts = {"up": 0, "down": 0}

    def _write(self, rec: dict[str, Any]) -> None:
        if self._fh is not None:
            self._fh.write(json.dumps(rec) + "\n")
            self._fh.flush()

    def close(self) -> None:
        self.flush()
        if self._fh is not None:
            self._fh.close()


class Relay:
    """Listens on `listen`, relays each connection to `upstream` through the link's delay model."""

    def __init__(self, profile: LinkProfile, listen: tuple[str, int], upstream: tuple[str, int],
                 byte_log: ByteLog | None = None, seed: int = 0) -> None:
        self.profile = profile
        self.listen = listen
        self.upstream = upstream
        self.bytes = byte_log or ByteLog(None)
        self._rng = random.Random(seed)
        self._cut_until = 0.0
        self._restored = asyncio.Event()
        self._restored.set()
        self._server: asyncio.Server | None = None
        self.connections = 0

    @property
    def cut(self) -> bool:
        return time.time() < self._cut_until

    async def start(self) -> tuple[str, int]:
        """Start listening; returns the bound address (port 0 picks a free one)."""
        self._server = await asyncio.start_server(self._serve, *self.listen)
        host, port = self._server.sockets[0].getsockname()[:2]
        log.info("relay %s: %s:%d -> %s:%d", self.profile.name, host, port, *self.upstream)
        return host, port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        self.bytes.close()

    def cut_for(self, seconds: float) -> None:
        """Take the link down for `seconds` from now (extends a cut already under way)."""
        self._cut_until = max(self._cut_until, time.time() + seconds)
        self._restored.clear()
        self.bytes.event("cut", duration_s=seconds)
        asyncio.get_running_loop().call_later(seconds, self._maybe_restore)

    def _maybe_restore(self) -> None:
        left = self._cut_until - time.time()
        if left > 0:  # the loop's monotonic timer may fire a hair before the wall clock passes the end
            asyncio.get_running_loop().call_later(left, self._maybe_restore)
            return
        if not self._restored.is_set():
            self._restored.set()
            self.bytes.event("restore")

    async def _link_up(self) -> None:
        while self.cut:
            await self._restored.wait()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            up_reader, up_writer = await self._connect_upstream(reader)
        except (OSError, _Abandoned):
            writer.close()
            return
        tasks = [asyncio.create_task(self._direction(reader, up_writer, "up")),
                 asyncio.create_task(self._direction(up_reader, writer, "down"))]
        await asyncio.gather(*tasks, return_exceptions=True)
        for w in (writer, up_writer):
            w.close()

    async def _connect_upstream(self, reader: asyncio.StreamReader) -> tuple[Any, Any]:
        """Connect on once the link is up; a client that closed while it was down never reached the broker."""
        await self._link_up()
        if getattr(reader, "_eof", False):  # StreamReader has no public "peer closed" while bytes are buffered
            raise _Abandoned
        reader, writer = await asyncio.open_connection(sock=await self._upstream_socket())
        writer.transport.set_write_buffer_limits(high=0)  # drain() waits for the kernel: no user-space backlog
        return reader, writer

    async def _upstream_socket(self) -> socket.socket:
        """The link-side socket, its buffers bounded BEFORE connecting (the window is fixed at the handshake).

        TCP then keeps at most ~64 kB in flight each way, far less than the tbf queue (netns.TBF_LIMIT_BYTES), so
        the shaper delays but never drops: the link loses packets only where the profile's `loss` says, and
        "up" bytes are counted close to when they leave on the link.
        """
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, LINK_SEND_BUFFER)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, LINK_RECEIVE_BUFFER)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, self.upstream)
        except OSError:
            sock.close()
            raise
        return sock

    async def _direction(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, direction: str) -> None:
        model = DelayModel(self.profile, random.Random(self._rng.random()))
        queue: collections.deque[_Chunk] = collections.deque()
        queued = [0]
        wake = asyncio.Event()
        room = asyncio.Event()
        room.set()
        pump = asyncio.create_task(self._pump(queue, queued, wake, room, dst, direction))
        try:
            while True:
                await room.wait()
                try:
                    data = await src.read(READ_BYTES)
                except (ConnectionError, OSError):
                    data = b""
                now = time.time()
                queue.append(_Chunk(model.release_at(now, len(data)), data))
                queued[0] += len(data)
                if queued[0] > MAX_QUEUED_BYTES:
                    room.clear()
                wake.set()
                if not data:
                    break
            await pump
        finally:
            pump.cancel()

    async def _pump(self, queue: collections.deque[_Chunk], queued: list[int], wake: asyncio.Event,
                    room: asyncio.Event, dst: asyncio.StreamWriter, direction: str) -> None:
        while True:
            while not queue:
                wake.clear()
                await wake.wait()
            chunk = queue[0]
            delay = chunk.release_at - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            await self._link_up()
            queue.popleft()
            queued[0] -= len(chunk.data)
            if queued[0] <= MAX_QUEUED_BYTES:
                room.set()
            if not chunk.data:
                if dst.can_write_eof():
                    dst.write_eof()
                return
            view = memoryview(chunk.data)
            for i in range(0, len(view), WRITE_BYTES):  # pieces, so the byte log follows the link's pace
                dst.write(view[i:i + WRITE_BYTES])
                try:
                    await dst.drain()
                except (ConnectionError, OSError):
                    return
                self.bytes.add(direction, len(view[i:i + WRITE_BYTES]))


class _Abandoned(Exception):
    """The client closed its connection while the link was down."""


# --- the relay process (run inside the device's namespace by the lab) ---------------------------------------


async def serve(profile: LinkProfile, listen: tuple[str, int], upstream: tuple[str, int], log_path: Path,
                seed: int) -> None:
    """Relay until stdin closes; stdin lines "cut SECONDS" take the link down."""
    relay = Relay(profile, listen, upstream, ByteLog(log_path), seed)
    await relay.start()
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    while line := await stdin.readline():
        parts = line.decode().split()
        if len(parts) == 2 and parts[0] == "cut":
            relay.cut_for(float(parts[1]))
    await relay.close()


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m fedpeft_edge.lab.relay", description=__doc__)
    p.add_argument("--profile", required=True, help="the LinkProfile as JSON")
    p.add_argument("--listen", default="127.0.0.1:1883")
    p.add_argument("--upstream", required=True, help="HOST:PORT of the broker")
    p.add_argument("--log", required=True, help="JSON-lines byte log")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s [relay] %(message)s")
    profile = LinkProfile(**json.loads(args.profile))
    lh, _, lp = args.listen.rpartition(":")
    uh, _, up = args.upstream.rpartition(":")
    asyncio.run(serve(profile, (lh, int(lp)), (uh, int(up)), Path(args.log), args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
