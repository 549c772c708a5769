"""Local events: a timer that fired, the connection coming up, a peer's broker-reported presence changing, a
sender the transport rate-limited.

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
    """A node's own timer fired (a round's deadline, the join timeout, a device's model wait, the end of a
    flooding device's mute)."""

    name: str
    round: int | None = None
    retry: int | None = None  # the round's retry (a deadline; a sync task's model wait)
    task_number: int | None = None  # an async task's number (its model wait)
    node: str = str(SERVER_ID)  # whose timer it is
    about: str | None = None  # the device a server timer concerns (unmute)


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


@dataclasses.dataclass(frozen=True)
class Throttled(LocalEvent):
    """The transport dropped `packets` packets that named `node` as their sender for going over its packet rate
    (comm_args.sender_rate_per_s), before any check. Whatever that sender had in flight may be lost with them,
    so the node stops waiting for it; honest traffic stays under the rate by design (the burst follows the
    manifest's chunk count), so only a flood, from whoever holds that sender's broker credentials, trips it."""

    node: str
    packets: int
    receiver: str = str(SERVER_ID)
    shed_s: float = 0.0  # > 0: the transport stopped hearing `node` for this long (transport/shedding.py)


LOCAL_EVENTS: tuple[type[LocalEvent], ...] = (Timer, ConnectionReady, Presence, Throttled)
