"""The server's record of receive-path drops: `dropped_message` records in metrics.jsonl, coalesced.

A hostile client can send thousands of packets a second, and every run-log record is fsynced, so only the
first drops of each second are written one by one; the rest are summed per (sender, topic, reason) and
written once a second with their `count` (a record without `count` stands for one drop).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

from fedpeft_edge.server.ports import RunLogWriter
from fedpeft_edge.transport.drops import DroppedMessage

_Key = tuple[str, str, str]


@dataclasses.dataclass
class _Sum:
    count: int
    bytes: int
    detail: str


class DropRecorder:
    """A transport `on_drop` sink writing `dropped_message` {sender, topic, reason, detail, bytes[, count]}."""

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

    def __call__(self, drop: DroppedMessage) -> None:
        now = self._clock()
        if now - self._window_start >= self.window_s:
            self.flush()
            self._window_start, self._written = now, 0
        if self._written < self.burst:
            self._written += 1
            self.runlog.write("dropped_message", **drop.record())
            return
        key = (drop.sender, drop.topic, drop.reason)
        if key not in self._sums and len(self._sums) >= self.max_keys:
            key = ("*", "*", drop.reason)
        s = self._sums.setdefault(key, _Sum(0, 0, drop.detail))
        s.count += drop.count
        s.bytes += drop.bytes

    def flush(self) -> None:
        """Write the summed drops (call before the run log closes)."""
        sums, self._sums = self._sums, {}
        for (sender, topic, reason), s in sums.items():
            self.runlog.write("dropped_message", sender=sender, topic=topic, reason=reason, detail=s.detail,
                              bytes=s.bytes, count=s.count)
