"""PUBACK waits alone: a wait sees only an acknowledgement counted after its mark, with its reason code, and
returns None when none came in time."""

from __future__ import annotations

import threading

from fedpeft_edge.transport.acks import PubAcks


def test_a_wait_returns_the_code_of_an_ack_after_its_mark() -> None:
    acks = PubAcks()
    acks.acked(7, 0)  # an earlier packet with the same message id
    mark = acks.mark()
    assert acks.wait(7, mark, 0.01) is None
    threading.Timer(0.05, acks.acked, (7, 0x87)).start()
    assert acks.wait(7, mark, 5.0) == 0x87
    assert acks.wait(7, -1, 0.01) is None  # taken once
