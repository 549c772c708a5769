"""PUBACKs as the network thread reports them, for the threads that wait on them: a packet's acknowledgement
is one counted after the wait's mark (a message id is reused once its PUBACK came, so an older one for the
same id does not count)."""

from __future__ import annotations

import threading
import time


class PubAcks:
    """Acknowledged message ids with their reason code and the order they came in."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._counter = 0
        self._acks: dict[int, tuple[int, int]] = {}  # mid -> (ack sequence number, reason code)

    def mark(self) -> int:
        """The count of PUBACKs so far: take it before publishing the packet a wait is for."""
        with self._cond:
            return self._counter

    def acked(self, mid: int, code: int) -> None:
        """Network thread: the broker acknowledged `mid` with reason `code` (>= 0x80: refused)."""
        with self._cond:
            self._counter += 1
            self._acks[mid] = (self._counter, code)
            self._cond.notify_all()

    def wait(self, mid: int, mark: int, timeout_s: float) -> int | None:
        """The reason code of `mid`'s PUBACK counted after `mark`, or None if none came within timeout_s."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                got = self._acks.get(mid)
                if got is not None and got[0] > mark:
                    del self._acks[mid]
                    return got[1]
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._cond.wait(remaining)
