"""Presence on the broker: this node's signed presence payload, and a peer's read into a `Presence` local event,
its signed (session, seq) only moving forward (retained presence is old by design, so no replay window)."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from typing import Any

from fedpeft_edge.drops import DropReason
from fedpeft_edge.errors import AuthError, CodecError
from fedpeft_edge.protocol import Presence
from fedpeft_edge.protocol import keys as M
from fedpeft_edge.transport.inbox import Inbound
from fedpeft_edge.transport.metering import LinkMeter
from fedpeft_edge.transport.signing import Signing
from fedpeft_edge.wire.auth import is_sealed

MAX_PRESENCE_BYTES = 4096
ECHO_INTERVAL_S = 1.0  # at most one presence echo a second (each reaches every device)


def presence_payload(signing: Signing, topic: str, node_id: str | int, session: float, status: str) -> bytes:
    """Presence of one connection: `time` names the session, `seq` orders ONLINE (1) before OFFLINE (2)."""
    body = json.dumps({"status": status, "node": node_id, "time": session,
                       "seq": 1 if status == M.PRESENCE_ONLINE else 2}).encode()
    return b"".join(signing.seal(topic, [body]))


class PresenceReader:
    """Peers' presence packets -> `Presence` events for node `node_id` (its own presence is ignored)."""

    def __init__(self, node_id: str, signing: Signing, meter: LinkMeter) -> None:
        self.node_id, self.signing, self.meter = node_id, signing, meter
        self._seen: dict[str, tuple[float, int]] = {}

    def read(self, node: str, item: Inbound) -> Presence | None:
        """The presence `node` published (metered); CodecError / AuthError (`replayed`) if it is malformed,
        forged or not newer than the last signed one; None for our own or an empty (cleared) one."""
        if node == self.node_id or not item.payload:
            return None
        self.meter.received(node, {M.MSG_ARG_KEY_TYPE: M.MSG_TYPE_PRESENCE}, [item.packet_bytes], item.arrived,
                            item.arrived, len(item.payload))
        signed = is_sealed(item.payload)
        body = presence_body(node, self.signing.open(node, item.topic, item.payload, replay=False))
        order = (float(body["time"]), int(body.get("seq", 1)))
        if signed:  # retained presence is old by design: its signed (session, seq) must only move forward
            if node in self._seen and order <= self._seen[node]:
                raise AuthError(f"presence {order} from {node!r} is not newer than {self._seen[node]}",
                                DropReason.REPLAYED)
            self._seen[node] = order
        return Presence(node=node, online=body["status"] == M.PRESENCE_ONLINE, since=float(body["time"]),
                        receiver=self.node_id)


class PresenceEcho:
    """When the server re-announces its presence (comm_args.presence_echo: a broker cluster whose retained store
    is node-local): after a device came online, at most once every `interval_s`, so a burst of devices coming
    online costs one echo."""

    def __init__(self, enabled: bool, interval_s: float = ECHO_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.enabled, self.interval_s, self._clock = enabled, interval_s, clock
        self._due, self._at = False, 0.0

    def heard(self, presence: Presence) -> None:
        """A peer's presence arrived: an ONLINE one makes an echo due."""
        if self.enabled and presence.online:
            self._due = True

    def take(self) -> bool:
        """True (once) when an echo is due and the last was `interval_s` ago: publish it now."""
        now = self._clock()
        if not self._due or now - self._at < self.interval_s:
            return False
        self._due, self._at = False, now
        return True


def presence_body(node: str, frame: memoryview) -> dict[str, Any]:
    """A presence payload's JSON object: status ONLINE or OFFLINE, a finite `time`, an int `seq`; CodecError else."""
    if frame.nbytes > MAX_PRESENCE_BYTES:
        raise CodecError(f"presence from {node} is {frame.nbytes} bytes; a presence payload is under 4 KiB")
    try:
        body = json.loads(bytes(frame), parse_constant=_refuse)
    except (ValueError, RecursionError) as exc:
        raise CodecError(f"presence from {node} is not JSON: {exc}") from exc
    if not isinstance(body, dict) or body.get("status") not in (M.PRESENCE_ONLINE, M.PRESENCE_OFFLINE):
        raise CodecError(f"presence from {node} must be an object with status ONLINE or OFFLINE")
    since, seq = body.get("time"), body.get("seq", 1)
    if not isinstance(since, (int, float)) or isinstance(since, bool) or not math.isfinite(since) \
            or not isinstance(seq, int) or isinstance(seq, bool):
        raise CodecError(f"presence from {node} needs a finite number `time` and an int `seq`")
    return body


def _refuse(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")
