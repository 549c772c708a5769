"""Synchronous rounds: a seeded sample of devices gets the round's task, the round closes at its deadline or as
soon as every selected device has answered, failed or gone offline with a quorum in; a round short of
`train_args.min_updates` is retried (a `retry` more), and the same error from every selected device twice in a
row ends the run (a deterministic failure that retrying cannot cure)."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping

from fedpeft_edge.protocol import Update
from fedpeft_edge.server.records import Accepted
from fedpeft_edge.server.round_policy import EngineCore, RoundPolicy
from fedpeft_edge.server.rounds import DropReason, OpenRound

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Replies:
    """What the selected devices of one synchronous round (one attempt of it) have done so far: sent an update
    that counts (`received`), failed (an error, an invalid update), or neither yet while online (`waiting`). Kept
    per message, so whether the round still waits for anyone is known in O(1) (`all_in`)."""

    round: OpenRound
    min_updates: int
    received: set[str] = dataclasses.field(default_factory=set)
    failed: set[str] = dataclasses.field(default_factory=set)  # reported an error or sent an invalid update
    waiting: set[str] = dataclasses.field(init=False)  # selected, online, not yet in or failed

    def __post_init__(self) -> None:
        self.waiting = set(self.round.selected)

    def judge(self, device_id: str, admitted: bool, round_idx: int, now: float) -> DropReason | None:
        """None if an update from device_id for round_idx counts (the device is then in), else why it is dropped
        (counted in the round's `dropped`)."""
        reason = self._reason(device_id, admitted, round_idx, now)
        if reason is None:
            self.received.add(device_id)
            self.waiting.discard(device_id)
        else:
            self.round.drop(reason)
        return reason

    def _reason(self, device_id: str, admitted: bool, round_idx: int, now: float) -> DropReason | None:
        cur = self.round
        if not admitted:
            return DropReason.UNKNOWN_DEVICE
        if round_idx != cur.index:
            return DropReason.STALE_ROUND
        if not cur.selects(device_id):
            return DropReason.NOT_SELECTED
        if device_id in self.received:
            return DropReason.DUPLICATE
        if now > cur.deadline:
            return DropReason.LATE
        return None

    def unaccept(self, device_id: str) -> None:
        """Forget an update that counted (it turned out invalid after judging)."""
        self.received.discard(device_id)

    def fail(self, device_id: str) -> None:
        """A selected device failed (error, invalid update): the round no longer waits for it."""
        self.failed.add(device_id)
        self.waiting.discard(device_id)

    def came_online(self, device_id: str) -> None:
        """A selected device back online is waited for again, if it still owes its update."""
        if self.round.selects(device_id) and device_id not in self.received and device_id not in self.failed:
            self.waiting.add(device_id)

    def went_offline(self, device_id: str) -> None:
        """An offline device is not waited for."""
        self.waiting.discard(device_id)

    def all_in(self) -> bool:
        """Every selected device has replied, failed or gone offline: no reason to wait for the deadline."""
        return not self.waiting

    def quorum(self) -> bool:
        return len(self.received) >= self.min_updates


class SyncRounds(RoundPolicy):
    """Deadline rounds over the sample the engine's RoundController draws; tasks carry the round's retry."""

    name = "sync"
    traffic_rounds_kept = 0

    def __init__(self, engine: EngineCore) -> None:
        super().__init__(engine)
        # fast failure: the errors the selected devices reported for the open attempt, and the last attempt's
        # error when every selected device reported that same one (round, error)
        self._errors: dict[str, str] = {}
        self._common_error: tuple[int, str] | None = None
        self._replies: Replies | None = None  # those of the last round opened

    @property
    def replies(self) -> Replies | None:
        """The open round's replies (None between rounds)."""
        rep = self._replies
        return rep if rep is not None and rep.round is self.engine.rounds.current else None

    # --- tasks ----------------------------------------------------------------------------------------------
    def open(self, cur: OpenRound, now: float) -> list[str]:
        selected = list(cur.selected)
        self._replies = Replies(cur, self.engine.args.min_updates)
        log.info("round %d (attempt %d): %s", cur.index, cur.retry, ", ".join(selected))
        for d in selected:
            self.engine.emit(self.engine.task(d, cur, now, retry=cur.retry, deadline=cur.deadline))
        return selected

    def joined(self, device_id: str, now: float) -> None:
        """Nothing: a device that joins mid-round waits for the next round's sample."""

    def task_owed(self, device_id: str, cur: OpenRound) -> bool:
        rep = self.replies
        return cur.selects(device_id) and (rep is None or device_id not in rep.received)

    def resend(self, device_id: str, cur: OpenRound, now: float) -> None:
        self.engine.emit(self.engine.task(device_id, cur, now, retry=cur.retry, deadline=cur.deadline, full=True))

    # --- what devices send ----------------------------------------------------------------------------------
    def update(self, msg: Update) -> None:
        eng = self.engine
        now = eng.clock.now()
        dev = eng.rounds.devices.get(msg.sender)
        admitted = dev is not None and dev.accepted
        rep = self.replies
        if rep is None:  # no round open: the update counts nowhere
            reason: DropReason | None = DropReason.STALE_ROUND if admitted else DropReason.UNKNOWN_DEVICE
        else:
            reason = rep.judge(msg.sender, admitted, msg.round, now)
        if reason is not None:
            log.info("dropped update from %s for round %s: %s", msg.sender, msg.round, reason.value)
            if rep is not None and reason is not DropReason.DUPLICATE and rep.round.selects(msg.sender):
                eng.device_dropped(rep.round, msg.sender, reason, msg.report)
            return
        if rep is None or not eng.aggregating:  # judge accepts only for an open round
            return
        if eng.admit(rep.round, msg, eng.global_state, now, staleness=None) is None:
            rep.unaccept(msg.sender)
            rep.fail(msg.sender)
        self._maybe_close_early(rep)

    def device_error(self, device_id: str, round_idx: int | None, error: str) -> None:
        if round_idx == self.engine.round_index():
            self._errors[device_id] = error
            self.fail_device(device_id, DropReason.DEVICE_ERROR)

    def fail_device(self, device_id: str, reason: DropReason) -> None:
        rep = self.replies
        if rep is not None and rep.round.selects(device_id) and device_id not in rep.received | rep.failed:
            rep.fail(device_id)
            rep.round.drop(reason)
            self.engine.device_dropped(rep.round, device_id, reason)
            self._maybe_close_early(rep)

    def came_online(self, device_id: str) -> None:
        rep = self.replies
        if rep is not None:
            rep.came_online(device_id)

    def went_offline(self, device_id: str) -> None:
        rep = self.replies
        if rep is not None:
            rep.went_offline(device_id)
            self._maybe_close_early(rep)

    # --- closing --------------------------------------------------------------------------------------------
    def deadline(self, cur: OpenRound) -> None:
        self._close_round()

    def closed(self, ok: bool) -> None:
        """Nothing: the next round starts from the engine's global model."""

    def _maybe_close_early(self, rep: Replies) -> None:
        # Only a round that has its quorum closes before its deadline: fewer than min_updates close a round
        # only through its own timer, never through what one device sent (an error report, a status). The one
        # exception takes every selected device: all of them (at least min_updates) failed with the same error,
        # which no single device can make happen (each report is signed by its own device) and a retry after the
        # deadline would not cure (issue 29's fast failure).
        if rep.all_in() and (rep.quorum() or self._unanimous_error()):
            self._close_round()

    def _unanimous_error(self) -> bool:
        cur = self.engine.rounds.current
        if cur is None or len(cur.selected) < max(1, self.engine.args.min_updates):
            return False
        errors = {self._errors.get(d) for d in cur.selected}
        return len(errors) == 1 and None not in errors

    def _close_round(self) -> None:
        eng = self.engine
        rep = self.replies
        if rep is None:
            return
        t0 = time.perf_counter()
        ok = rep.quorum() and eng.has_accepted and eng.aggregate()
        eng.end_round(rep.round, ok, time.perf_counter() - t0)

    def missing(self, cur: OpenRound, accepted: list[Accepted]) -> None:
        got = {a.device_id for a in accepted}
        rep = self._replies  # the closed round's (the engine closed it before its records)
        failed = rep.failed if rep is not None and rep.round is cur else set()
        for d in cur.selected:
            if d not in got and d not in failed:
                dev = self.engine.rounds.devices.get(d)
                if dev is not None and not dev.online:  # lost mid-round: counted in the round's `dropped`
                    cur.drop(DropReason.OFFLINE)
                reason = DropReason.OFFLINE if dev is not None and not dev.online else DropReason.NO_UPDATE
                self.engine.device_dropped(cur, d, reason)

    def recorded_selection(self, cur: OpenRound, accepted: list[Accepted]) -> tuple[str, ...]:
        return cur.selected

    def ends_run(self, cur: OpenRound, ok: bool) -> bool:
        errors, self._errors = self._errors, {}
        return not ok and self._same_error_again(cur, errors)

    def _same_error_again(self, cur: OpenRound, errors: Mapping[str, str]) -> bool:
        """Every selected device failed this attempt with one and the same error: say so now (the attempt
        closed at once, no deadline waited for); the second attempt in a row that does ends the run (a
        deterministic failure, such as a wrong input size, is not cured by retrying)."""
        selected = cur.selected
        distinct = {errors.get(d) for d in selected}
        if not selected or len(distinct) != 1 or None in distinct:
            self._common_error = None
            return False
        error = str(next(iter(distinct)))
        if self._common_error == (cur.index, error):
            self.engine.finish(f"round {cur.index} failed twice in a row on every selected device ({len(selected)}) "
                               f"with the same error: {error}; retrying cannot help: fix what the error names (the "
                               "devices' config, model or data) and start the run again")
            return True
        self._common_error = (cur.index, error)
        log.error("round %d attempt %d: every selected device (%d) failed with the same error: %s; retrying once "
                  "(the run ends if it repeats)", cur.index, cur.retry, len(selected), error)
        return False
