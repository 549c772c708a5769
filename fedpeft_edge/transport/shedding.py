"""Shedding a flooding sender at the broker: the server stops subscribing to its topics for a while.

A per-sender rate limit (wire/auth.py SenderRate) drops a flood before any check, but each packet still costs
the server's network thread a read, a parse and an acknowledgement (about 50 us in paho): a holder of one
device's broker credentials flooding at 5,000 packets/s took 0.3 of a core from the server. Where the server
knows its devices (provisioned runs: one public key per device), it subscribes to each device's topics by
name instead of by wildcard, so it can unsubscribe from one device's: the broker then discards that device's
packets (no subscriber) and the server pays nothing for them. After `comm_args.shed_s` it subscribes again;
a flood that goes on is shed again at its first packets over the rate. Honest traffic stays under the rate by
design (the burst follows the run's largest message), so only whoever floods one device's topics loses that
device's rounds, and the operator revokes it (`fedpeft-edge provision --revoke DEVICE`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from fedpeft_edge.transport.topics import Topics


class SenderShed:
    """Which of the server's per-device subscriptions are shed, until when (monotonic seconds)."""

    def __init__(self, topics: Topics, devices: Sequence[str] | None, shed_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._topics = topics
        self.devices = tuple(sorted(devices)) if devices else None  # None: wildcards, nothing can be shed
        self.shed_s = shed_s
        self._clock = clock
        self._until: dict[str, float] = {}

    def subscriptions(self) -> list[str]:
        """The server's topics now: every device's up-link and presence (wildcards where devices are unknown),
        less the shed ones."""
        if self.devices is None:
            return [self._topics.all_d2s(), self._topics.all_presence()]
        return [t for d in self.devices if d not in self._until for t in self.topics_of(d)]

    def topics_of(self, device: str) -> list[str]:
        return [self._topics.d2s(device), self._topics.presence(device)]

    def shed(self, device: str) -> bool:
        """Shed `device` (True) unless it cannot be (wildcard subscriptions, an unknown device, shed_s 0) or
        already is (False)."""
        if self.devices is None or self.shed_s <= 0 or device not in self.devices or device in self._until:
            return False
        self._until[device] = self._clock() + self.shed_s
        return True

    def due(self) -> list[str]:
        """The shed devices whose time is up (no longer shed: subscribe to them again)."""
        if not self._until:
            return []
        now = self._clock()
        back = [d for d, t in self._until.items() if t <= now]
        for d in back:
            del self._until[d]
        return back

    @property
    def shed_now(self) -> tuple[str, ...]:
        return tuple(sorted(self._until))
