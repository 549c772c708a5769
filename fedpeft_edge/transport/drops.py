"""Receive-path drops: what was refused, from whom and why; logged with rate limiting, handed to a sink."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DroppedMessage:
    """One inbound packet or message the transport refused (metrics.jsonl kind `dropped_message`)."""

    sender: str  # the node the topic names (the claimed sender; unauthenticated unless reason says so)
    topic: str
    reason: str  # a short code: malformed, unsigned, bad_signature, replayed, stale, undecryptable, ...
    detail: str  # the error's message
    bytes: int  # payload bytes of what was dropped
    count: int = 1  # packets this record stands for (a full inbox reports its drops together)

    def record(self) -> dict[str, object]:
        out = dataclasses.asdict(self)
        if self.count == 1:
            del out["count"]
        return out


class DropLog:
    """Logs drops at WARNING, at most `burst` per reason per `interval_s`, then one line with the count."""

    def __init__(
        self, sink: Callable[[DroppedMessage], None] | None = None, burst: int = 5, interval_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.sink = sink
        self.burst = burst
        self.interval_s = interval_s
        self._clock = clock
        self._window: dict[str, tuple[float, int]] = {}  # reason -> (window start, drops in it)
        self.counts: dict[str, int] = {}

    def __call__(self, drop: DroppedMessage) -> None:
        self.counts[drop.reason] = self.counts.get(drop.reason, 0) + drop.count
        now = self._clock()
        start, n = self._window.get(drop.reason, (now, 0))
        if now - start > self.interval_s:
            if n > self.burst:
                log.warning("%d more %s drops in the last %.0f s (not logged one by one)", n - self.burst,
                            drop.reason, now - start)
            start, n = now, 0
        self._window[drop.reason] = (start, n + 1)
        if n < self.burst:
            log.warning("dropped %d bytes from %s on %s (%s): %s", drop.bytes, drop.sender, drop.topic,
                        drop.reason, drop.detail[:300])
        if self.sink is not None:
            try:
                self.sink(drop)
            except Exception:  # a failing sink never stops the receive loop
                log.exception("drop sink failed")
