"""The bounded inbox between the network thread and the receive thread, with the per-sender rate limit.

The network thread only offers packets: `Inbox.offer` counts the sender's rate, checks the bounds and queues the
raw bytes, or counts the packet as an overflow (never waits: that thread also reads the PUBACKs the receive
thread's sends wait for). The receive thread takes items in order and reports the overflow counts as drops.
Local items (events, the stop mark) never wait for room.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from typing import Any

from fedpeft_edge.config import CommArgs
from fedpeft_edge.drops import DropReason
from fedpeft_edge.protocol import LocalEvent
from fedpeft_edge.protocol import keys as M
from fedpeft_edge.transport.topics import topic_node
from fedpeft_edge.wire.auth import SenderRate
from fedpeft_edge.wire.limits import sender_burst_for
from fedpeft_edge.wire.packet import MQTT_MAX_PACKET

_MAX_OVERFLOW_KEYS = 256  # (topic, reason) pairs counted between two reports; a new pair past it is not kept


@dataclasses.dataclass
class Inbound:
    """A packet as it arrived: its topic, payload, size on the wire and arrival time."""

    topic: str
    payload: bytes
    packet_bytes: int
    arrived: float


@dataclasses.dataclass
class Local:
    """A local event for this node's own observers (a timer, ConnectionReady): never passes a codec."""

    event: LocalEvent


STOP = object()  # makes the receive loop return

Overflow = dict[tuple[str, DropReason], tuple[int, int]]  # (topic, reason) -> (packets, bytes)


class Inbox:
    """Queued inbound packets, bounded in packets and bytes, and each sender's packet rate."""

    def __init__(self, max_messages: int, max_bytes: int, rate: SenderRate, node_id: str, is_server: bool) -> None:
        self.max_messages, self.max_bytes, self.rate = max_messages, max_bytes, rate
        self.node_id, self.is_server = node_id, is_server
        self._queue: queue.Queue[Any] = queue.Queue()
        self._lock = threading.Lock()
        self._count = self._bytes = 0  # inbound packets and payload bytes queued
        self._overflow: Overflow = {}  # dropped on the network thread: a full inbox, a sender over its rate

    def offer(self, topic: str, payload: bytes, packet_bytes: int) -> bool:
        """Network thread: queue the packet, or count it as dropped (a sender over its rate, a full inbox)."""
        n = len(payload)
        with self._lock:
            limited = not self._rate_ok(topic)  # before the inbox: a flood takes neither its room nor CPU
            full = self._count >= self.max_messages or self._bytes + n > self.max_bytes
            if full or limited:  # reported from the receive thread (drop sinks are not thread-safe)
                key = (topic, DropReason.RATE_LIMITED if limited else DropReason.INBOX_FULL)
                count, nbytes = self._overflow.get(key, (0, 0))
                if count or len(self._overflow) < _MAX_OVERFLOW_KEYS:
                    self._overflow[key] = (count + 1, nbytes + n)
                return False
            self._count += 1
            self._bytes += n
        self._queue.put(Inbound(topic, payload, packet_bytes, time.time()))
        return True

    def _rate_ok(self, topic: str) -> bool:
        """The sender's packet rate (comm_args.sender_rate_per_s), before the packet is queued, verified,
        buffered or parsed; our own packets (presence echoes) are not counted."""
        node = self.sender(topic)
        return node == self.node_id or self.rate.allow(node)

    def sender(self, topic: str) -> str:
        """The sender a packet's topic names (a device's down-link names the device; its sender is the server)."""
        node = topic_node(topic)
        if node == self.node_id and not self.is_server and "/s2d/" in topic:
            node = str(M.SERVER_ID)
        return node

    def post(self, item: Local | object) -> None:
        """Any thread: queue a local item (it takes no room)."""
        self._queue.put(item)

    def get(self, block: bool, timeout: float | None) -> Any:
        """The next item (an Inbound, a Local or STOP); queue.Empty when none came in time."""
        item = self._queue.get(block=block, timeout=timeout if block else None)
        if isinstance(item, Inbound):
            with self._lock:
                self._count -= 1
                self._bytes -= len(item.payload)
        return item

    @property
    def overflowed(self) -> bool:
        return bool(self._overflow)

    def take_overflow(self) -> Overflow:
        """The packets dropped on the network thread since the last call, per (topic, reason)."""
        with self._lock:
            overflow, self._overflow = self._overflow, {}
        return overflow

    def explain(self, reason: DropReason, count: int) -> str:
        """A drop record's detail for `count` packets dropped here for `reason`, naming the bound they broke."""
        if reason is DropReason.RATE_LIMITED:
            return (f"{count} packets over comm_args.sender_rate_per_s={self.rate.rate_per_s:g} (burst "
                    f"{self.rate.burst}), dropped before any check")
        return (f"{count} packets arrived while the inbox was full (comm_args.inbox_max_messages "
                f"{self.max_messages} / inbox_max_bytes {self.max_bytes})")


def build_inbox(comm_args: CommArgs, node_id: str, is_server: bool) -> Inbox:
    """The inbox comm_args bound: inbox_max_messages, inbox_max_bytes (at least one largest packet: the inbox is
    shared by every sender; what bounds one sender's share is its packet rate, checked before it is queued)."""
    max_bytes = max(comm_args.inbox_max_bytes, min(comm_args.max_message_bytes, MQTT_MAX_PACKET))
    # receive_limits() derives the burst from the run's manifest (the server app and every device manager apply
    # it); a bare transport knows no manifest, so the largest message it takes is max_update_bytes: a burst of
    # 256 packets at 20/s would drop a large chunked update it is otherwise configured to accept
    burst = comm_args.sender_burst or sender_burst_for(comm_args, comm_args.max_update_bytes)
    rate = SenderRate(comm_args.sender_rate_per_s, burst)
    return Inbox(comm_args.inbox_max_messages, max_bytes, rate, node_id, is_server)
