"""A comm manager's observers: each received message and local event handed to every one of them, on the receive
thread; whatever a handler raises is recorded as a `handler_error` drop, never the receive loop's end."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from fedpeft_edge.drops import DroppedMessage, DropReason
from fedpeft_edge.protocol import LocalEvent

log = logging.getLogger(__name__)


class Observers:
    """FedML observers of node `node_id`: `receive_message(type, message)`, and `receive_local(event)` where an
    observer takes local events."""

    def __init__(self, node_id: str, drops: Callable[[DroppedMessage], None]) -> None:
        self.node_id, self.drops = node_id, drops
        self._observers: list[Any] = []

    def add(self, observer: Any) -> None:
        self._observers.append(observer)

    def remove(self, observer: Any) -> None:
        self._observers.remove(observer)

    def dispatch(self, message: Any) -> None:
        """Hand a message to every observer; whatever a handler raises is a drop, never the loop's end."""
        for observer in list(self._observers):
            try:
                observer.receive_message(message.get_type(), message)
            except Exception as exc:  # the edge: nothing a message causes may end the receive loop
                log.debug("handler failed", exc_info=True)
                self.drops(DroppedMessage(str(message.get_sender_id()), "", DropReason.HANDLER_ERROR,
                                          f"{type(exc).__name__}: {exc}", 0))

    def dispatch_local(self, event: LocalEvent) -> None:
        """Hand a local event to the observers that take them (`receive_local`); it never passes the codec."""
        for observer in list(self._observers):
            receive_local = getattr(observer, "receive_local", None)
            if receive_local is None:
                continue
            try:
                receive_local(event)
            except Exception as exc:  # the edge: nothing may end the receive loop
                log.debug("local event handler failed", exc_info=True)
                self.drops(DroppedMessage(self.node_id, "", DropReason.HANDLER_ERROR,
                                          f"{type(exc).__name__}: {exc}", 0))
