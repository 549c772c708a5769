"""The one drop vocabulary: why a packet, message or update was refused (`DropReason`), and the one recorder.

Every refusal in the project names a `DropReason`: the transport's receive path (malformed, unsigned,
replayed, over a rate ...), the trust boundary (`forbidden_type`), the round engine (rate limits, unknown
devices) and the round's own judgement of an update (late, stale, over the norm bound ...). The values are
the strings the run records have always held (`dropped_message.reason`, `device_round.drop_reason`, the keys
of a `round` record's `dropped`), so older run directories read the same.

This module sits beside `errors.py` at the package root: `wire/` and `protocol/` raise `AuthError` with these
reasons, and `transport/` and `server/` record them, so every package imports it without an edge between them.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

from fedpeft_edge.records import DroppedMessage

log = logging.getLogger(__name__)

__all__ = ["DropReason", "DropRecorder", "DroppedMessage", "RecordWriter"]


class DropReason(str, enum.Enum):
    """Why something was refused. A str, so a reason is its value wherever a record or a log holds it."""

    # the receive path (transport): refused before the packet became a message
    MALFORMED = "malformed"  # the frame or its fields do not decode
    UNSIGNED = "unsigned"  # no (or an unsupported) signature where one is required
    BAD_SIGNATURE = "bad_signature"
    UNKNOWN_SENDER = "unknown_sender"  # no public key for the sender
    STALE = "stale"  # stamped outside comm_args.replay_window_s
    REPLAYED = "replayed"
    DUPLICATE = "duplicate"  # a message id (transport) or an update (round) that arrived before
    FORBIDDEN_TYPE = "forbidden_type"  # a type its sender's role may not send on that channel
    RATE_LIMITED = "rate_limited"  # over a sender rate (transport) or a join / resend rate (engine)
    INBOX_FULL = "inbox_full"
    CHUNK_REFUSED = "chunk_refused"
    TRANSFER_EXPIRED = "transfer_expired"  # a chunked transfer that never completed
    HANDLER_ERROR = "handler_error"  # the message handler raised
    INTERNAL_ERROR = "internal_error"  # the decoder raised something other than a CodecError
    UNDECRYPTABLE = "undecryptable"  # a sealed blob that does not open (wrong key, tampered, moved header)
    UNENCRYPTED = "unencrypted"  # plaintext tensors where comm_args.encrypt requires them sealed
    # the round engine: refused after parsing
    INVALID = "invalid"  # fields (or an update's tensors) that do not validate
    UNKNOWN_DEVICE = "unknown_device"
    # the round: why an update was not aggregated (the keys of a round's `dropped` counter)
    STALE_ROUND = "stale_round"
    NOT_SELECTED = "not_selected"
    LATE = "late"
    DEVICE_ERROR = "device_error"
    NORM_BOUND = "norm_bound"  # the update's distance from the global model exceeds train_args.max_update_norm
    TOO_STALE = "too_stale"  # async: trained on a global model more than train_args.max_staleness versions old
    NO_UPDATE = "no_update_by_deadline"
    OFFLINE = "went_offline"  # a selected device lost mid-round (its presence went offline) and never sent one

    def __str__(self) -> str:
        return self.value


class RecordWriter(Protocol):
    """Where `dropped_message` records go (the server's run log)."""

    def write(self, kind: str, **fields: Any) -> dict[str, Any]: ...


_Key = tuple[str | None, str | None, str]


@dataclasses.dataclass
class _Sum:
    count: int
    bytes: int
    detail: str


class DropRecorder:
    """The one recorder of drops: counts them per reason, logs them at WARNING (at most `log_burst` per reason
    per `log_interval_s`, then one line with the count), writes them to `writer` as `dropped_message` records,
    and hands each to `sink` (a failing sink is logged, never raised).

    Records are coalesced: a hostile client can send thousands of packets a second and every run-log record is
    fsynced, so only the first `burst` drops of each `window_s` are written one by one; the rest are summed per
    (sender, topic, reason) and written once a window with their `count`. `total` counts every drop,
    `coalesced` those written as part of a summed record. Not thread-safe: call it from one thread.
    """

    def __init__(
        self, writer: RecordWriter | None = None, *, sink: Callable[[DroppedMessage], None] | None = None,
        window_s: float = 1.0, burst: int = 20, max_keys: int = 64, log_burst: int = 5, log_interval_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.writer = writer
        self.sink = sink
        self.window_s = window_s
        self.burst = burst
        self.max_keys = max_keys
        self.log_burst = log_burst
        self.log_interval_s = log_interval_s
        self._clock = clock
        self._window_start = clock()
        self._written = 0
        self._sums: dict[_Key, _Sum] = {}
        self._log_window: dict[str, tuple[float, int]] = {}  # reason -> (window start, drops in it)
        self.counts: dict[str, int] = {}
        self.total = 0
        self.coalesced = 0

    def __call__(self, drop: DroppedMessage) -> None:
        """Record a drop (the transport's `on_drop` sink signature)."""
        now = self._clock()
        reason = str(drop.reason)
        self.counts[reason] = self.counts.get(reason, 0) + drop.count
        self.total += drop.count
        self._log(drop, reason, now)
        if self.writer is not None:
            self._write(self.writer, drop, reason, now)
        if self.sink is not None:
            try:
                self.sink(drop)
            except Exception:  # a failing sink never stops the receive loop
                log.exception("drop sink failed")

    def drop(self, sender: str | None, reason: DropReason, detail: str, topic: str | None = None,
             nbytes: int | None = None) -> None:
        """A message refused after parsing (its topic and size may be unknown: None)."""
        self(DroppedMessage(sender=sender, topic=topic, reason=reason, detail=detail, bytes=nbytes))

    def _log(self, drop: DroppedMessage, reason: str, now: float) -> None:
        start, n = self._log_window.get(reason, (now, 0))
        if now - start > self.log_interval_s:
            if n > self.log_burst:
                log.warning("%d more %s drops in the last %.0f s (not logged one by one)", n - self.log_burst,
                            reason, now - start)
            start, n = now, 0
        self._log_window[reason] = (start, n + 1)
        if n < self.log_burst:
            log.warning("dropped %s bytes from %s on %s (%s): %s", drop.bytes, drop.sender, drop.topic, reason,
                        drop.detail[:300])

    def _write(self, writer: RecordWriter, drop: DroppedMessage, reason: str, now: float) -> None:
        if now - self._window_start >= self.window_s:
            self.flush()
            self._window_start, self._written = now, 0
        if self._written < self.burst:
            self._written += 1
            writer.write(DroppedMessage.KIND, **dataclasses.replace(drop, detail=drop.detail[:500]).fields())
            return
        self.coalesced += drop.count
        key: _Key = (drop.sender, drop.topic, reason)
        if key not in self._sums and len(self._sums) >= self.max_keys:
            key = ("*", "*", reason)
        s = self._sums.setdefault(key, _Sum(0, 0, drop.detail[:500]))
        s.count += drop.count
        s.bytes += drop.bytes or 0

    def flush(self) -> None:
        """Write the summed drops (call before the run log closes)."""
        sums, self._sums = self._sums, {}
        if self.writer is None:
            return
        for (sender, topic, reason), s in sums.items():
            rec = DroppedMessage(sender=sender, topic=topic, reason=reason, detail=s.detail, bytes=s.bytes,
                                 count=s.count)
            self.writer.write(DroppedMessage.KIND, **rec.fields(always_count=True))
