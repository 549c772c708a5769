"""Local events: a timer that fired, the connection coming up, a peer's broker-reported presence changing.

They are built in-process (by a node's own timers or by its transport) and handed to the node through
`receive_local`, never through a frame. They have no wire form at all (no message type, no `to_params`, no
parser), so nothing a peer sends can ever become one: a signed frame from a provisioned device cannot fire the
server's round deadline or mark another device offline.
"""

from __future__ import annotations

import dataclasses

from fedpeft_edge.protocol.keys import SERVER_ID


class LocalEvent:
    """Base of the local events (deliberately not a ProtocolMessage)."""


@dataclasses.dataclass(frozen=True)
class Timer(LocalEvent):
    """A node's own timer fired (a round's deadline, the join timeout, a device's model wait)."""

    name: str
    round: int | None = None
    retry: int | None = None  # the round's retry (a deadline; a sync task's model wait)
    task_number: int | None = None  # an async task's number (its model wait)
    node: str = str(SERVER_ID)


@dataclasses.dataclass(frozen=True)
class ConnectionReady(LocalEvent):
    """The transport (re)connected to the broker."""

    node: str


@dataclasses.dataclass(frozen=True)
class Presence(LocalEvent):
    """A peer's retained presence changed, as the broker (or the in-memory bus) reported it to the transport."""

    node: str
    online: bool
    since: float | None = None  # the peer's clock when it published that presence (a session id)
    receiver: str = str(SERVER_ID)


LOCAL_EVENTS: tuple[type[LocalEvent], ...] = (Timer, ConnectionReady, Presence)
