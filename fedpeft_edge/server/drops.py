"""The server's ONE record of drops: `dropped_message` records in metrics.jsonl, coalesced.

Both kinds go through it: what the transport refused before it became a message (malformed, unsigned,
replayed ...: the comm manager's `on_drop`) and what the round engine refused after parsing (rate limits,
unknown devices, invalid joins). A hostile client can send thousands of packets a second, and every run-log
record is fsynced, so only the first drops of each second are written one by one; the rest are summed per
(sender, topic, reason) and written once a second with their `count` (a record without `count` stands for
one drop).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

from fedpeft_edge.server.ports import RunLogWriter
from fedpeft_edge.transport.drops import DroppedMessage

_Key = tuple[str | None, str | None, str]


@dataclasses.dataclass
class _Sum:
    count: int
    bytes: int
    detail: str


class DropRecorder:
    """Writes `dropped_message` {sender, topic, reason, detail, bytes[, count]}; a transport `on_drop` sink.

    `total` counts every drop; `coalesced` those written as part of a summed record.
    """

    def __init__(
        self, runlog: RunLogWriter, window_s: float = 1.0, burst: int = 20, max_keys: int = 64,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.runlog = runlog
        self.window_s = window_s
        self.burst = burst
        self.max_keys = max_keys
        self._clock = clock
        self._window_start = clock()
        self._written = 0
        self._sums: dict[_Key, _Sum] = {}
        self.total = 0
        self.coalesced = 0

    def __call__(self, drop: DroppedMessage) -> None:
        self._add(drop.sender, drop.topic, drop.reason, drop.detail, drop.bytes, drop.count)

    def drop(self, sender: str | None, reason: str, detail: str, topic: str | None = None,
             nbytes: int | None = None) -> None:
        """A message the engine refused after parsing (its topic and size may be unknown: None)."""
        self._add(sender, topic, reason, detail, nbytes, 1)

    def _add(self, sender: str | None, topic: str | None, reason: str, detail: str, nbytes: int | None,
             count: int) -> None:
        self.total += count
        now = self._clock()
        if now - self._window_start >= self.window_s:
            self.flush()
            self._window_start, self._written = now, 0
        if self._written < self.burst:
            self._written += 1
            extra = {} if count == 1 else {"count": count}
            self.runlog.write("dropped_message", sender=sender, topic=topic, reason=reason, detail=detail[:500],
                              bytes=nbytes, **extra)
            return
        self.coalesced += count
        key: _Key = (sender, topic, reason)
        if key not in self._sums and len(self._sums) >= self.max_keys:
            key = ("*", "*", reason)
        s = self._sums.setdefault(key, _Sum(0, 0, detail[:500]))
        s.count += count
        s.bytes += nbytes or 0

    def flush(self) -> None:
        """Write the summed drops (call before the run log closes)."""
        sums, self._sums = self._sums, {}
        for (sender, topic, reason), s in sums.items():
            self.runlog.write("dropped_message", sender=sender, topic=topic, reason=reason, detail=s.detail,
                              bytes=s.bytes, count=s.count)
