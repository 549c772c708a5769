"""Observer dispatch alone: every observer gets each message and the local events it takes; a handler's exception
is a `handler_error` drop, and the next observer still gets the message."""

from __future__ import annotations

from typing import Any

from fedpeft_edge.drops import DroppedMessage
from fedpeft_edge.protocol import ConnectionReady
from fedpeft_edge.transport.fedml import Message
from fedpeft_edge.transport.observers import Observers


class _Seen:
    def __init__(self, fail: bool = False) -> None:
        self.got: list[Any] = []
        self.fail = fail

    def receive_message(self, msg_type: Any, message: Any) -> None:
        self.got.append(msg_type)
        if self.fail:
            raise ValueError("boom")


class _Local(_Seen):
    def receive_local(self, event: Any) -> None:
        self.got.append(event)
        if self.fail:
            raise RuntimeError("tick")


def test_handler_errors_are_drops_and_every_observer_is_served() -> None:
    drops: list[DroppedMessage] = []
    observers = Observers("0", drops.append)
    first, second, plain = _Local(fail=True), _Local(), _Seen()
    for o in (first, second, plain):
        observers.add(o)
    observers.dispatch(Message(5, "dev-a", 0))
    observers.dispatch_local(ConnectionReady("0"))
    assert first.got == second.got == [5, ConnectionReady("0")] and plain.got == [5]
    assert [(d.sender, d.reason) for d in drops] == [("dev-a", "handler_error"), ("0", "handler_error")]
    assert "ValueError: boom" in drops[0].detail
    observers.remove(first)
    observers.dispatch(Message(5, "dev-a", 0))
    assert len(drops) == 2
