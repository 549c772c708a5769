"""The MQTT connection's state machine: NEW -> CONNECTING -> CONNECTED <-> RECONNECTING -> CLOSED, thread-safe.

paho's network thread (connect, subscribe and disconnect callbacks) and the caller's threads (connect, close) all
move it; every move is checked against the allowed transitions under one lock, so a late callback can never
re-open a closed connection.
"""

from __future__ import annotations

import enum
import threading


class State(enum.Enum):
    """Connection states; reconnects go CONNECTED -> RECONNECTING -> CONNECTED."""

    NEW = "new"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"
    CLOSED = "closed"


_ALLOWED: dict[State, frozenset[State]] = {
    State.NEW: frozenset({State.CONNECTING, State.CLOSED}),
    State.CONNECTING: frozenset({State.CONNECTED, State.RECONNECTING, State.CLOSED}),
    State.CONNECTED: frozenset({State.RECONNECTING, State.CLOSED}),
    State.RECONNECTING: frozenset({State.CONNECTED, State.RECONNECTING, State.CLOSED}),
    State.CLOSED: frozenset(),
}


class ConnectionState:
    """One connection's state; `move` is the only way to change it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._state = State.NEW

    @property
    def current(self) -> State:
        return self._state

    def move(self, to: State) -> State | None:
        """Go to `to` if the current state allows it and return the state left; None (and no change) if not,
        e.g. a disconnect or subscription callback that arrives after close()."""
        with self._lock:
            left = self._state
            if to not in _ALLOWED[left]:
                return None
            self._state = to
            return left
