"""The inbox alone: bounded in packets and bytes, each sender's rate counted before a packet is queued, what it
refuses summed per (topic, reason) for the receive thread; local items never wait for room."""

from __future__ import annotations

import queue

import pytest

from fedpeft_edge.drops import DropReason
from fedpeft_edge.protocol import ConnectionReady
from fedpeft_edge.transport.inbox import STOP, Inbound, Inbox, Local
from fedpeft_edge.wire.auth import SenderRate

D2S = "fedpeft/r/d2s/dev-a"


def _inbox(max_messages: int = 3, max_bytes: int = 100, burst: int = 1000, node: str = "0") -> Inbox:
    return Inbox(max_messages, max_bytes, SenderRate(1.0, burst, clock=lambda: 0.0), node, node == "0")


def test_a_packet_is_queued_with_its_size_and_frees_its_room_when_taken() -> None:
    inbox = _inbox(max_messages=1)
    assert inbox.offer(D2S, b"abc", 40)
    assert not inbox.offer(D2S, b"def", 40)  # full: one packet
    item = inbox.get(block=False, timeout=None)
    assert isinstance(item, Inbound) and (item.topic, item.payload, item.packet_bytes) == (D2S, b"abc", 40)
    assert inbox.offer(D2S, b"ghi", 40)
    with pytest.raises(queue.Empty):
        _inbox().get(block=True, timeout=0.01)


def test_a_full_inbox_sums_its_drops_per_topic_and_names_the_bound() -> None:
    inbox = _inbox(max_messages=10, max_bytes=10)
    assert inbox.offer(D2S, b"x" * 8, 50)
    assert not inbox.offer(D2S, b"y" * 5, 50) and not inbox.offer(D2S, b"z" * 4, 50)
    assert inbox.overflowed
    assert inbox.take_overflow() == {(D2S, DropReason.INBOX_FULL): (2, 9)}
    assert not inbox.overflowed and inbox.take_overflow() == {}
    assert "inbox_max_messages 10 / inbox_max_bytes 10" in inbox.explain(DropReason.INBOX_FULL, 2)


def test_a_sender_over_its_rate_is_counted_before_the_inbox_and_ours_are_not() -> None:
    inbox = _inbox(max_messages=10, burst=2)
    assert inbox.offer(D2S, b"1", 1) and inbox.offer(D2S, b"2", 1)
    assert not inbox.offer(D2S, b"3", 1)
    assert inbox.offer("fedpeft/r/d2s/dev-b", b"1", 1)  # a bucket per sender
    assert inbox.offer("fedpeft/r/presence/0", b"p", 1)  # the server's own presence echo: not counted
    assert inbox.take_overflow() == {(D2S, DropReason.RATE_LIMITED): (1, 1)}
    assert "sender_rate_per_s=1 (burst 2)" in inbox.explain(DropReason.RATE_LIMITED, 1)
    device = _inbox(burst=1, node="dev-a")
    assert device.offer("fedpeft/r/s2d/dev-a", b"1", 1)  # the down-link names the device; its sender is the server
    assert not device.offer("fedpeft/r/presence/0", b"2", 1)


def test_local_items_take_no_room() -> None:
    inbox = _inbox(max_messages=1)
    assert inbox.offer(D2S, b"a", 1)
    inbox.post(Local(ConnectionReady("0")))
    inbox.post(STOP)
    assert [type(inbox.get(False, None)) for _ in range(2)] == [Inbound, Local]
    assert inbox.get(False, None) is STOP
