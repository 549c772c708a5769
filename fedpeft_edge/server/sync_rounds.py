"""Synchronous rounds: a seeded sample of devices gets the round's task, the round closes at its deadline or as
soon as every selected device has answered, failed or gone offline with a quorum in; a round short of
`train_args.min_updates` is retried (a `retry` more), and the same error from every selected device twice in a
row ends the run (a deterministic failure that retrying cannot cure)."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

from fedpeft_edge.protocol import Update
from fedpeft_edge.server.records import Accepted
from fedpeft_edge.server.round_policy import EngineCore, RoundPolicy
from fedpeft_edge.server.rounds import DropReason, OpenRound

log = logging.getLogger(__name__)


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

    # --- tasks ----------------------------------------------------------------------------------------------
    def open(self, cur: OpenRound, now: float) -> list[str]:
        selected = list(cur.selected)
        log.info("round %d (attempt %d): %s", cur.index, cur.retry, ", ".join(selected))
        for d in selected:
            self.engine.emit(self.engine.task(d, cur, now, attempt=cur.retry, deadline=cur.deadline))
        return selected

    def joined(self, device_id: str, now: float) -> None:
        """Nothing: a device that joins mid-round waits for the next round's sample."""

    def task_owed(self, device_id: str, cur: OpenRound) -> bool:
        return cur.selects(device_id) and device_id not in cur.received

    def resend(self, device_id: str, cur: OpenRound, now: float) -> None:
        self.engine.emit(self.engine.task(device_id, cur, now, attempt=cur.retry, deadline=cur.deadline, full=True))

    # --- what devices send ----------------------------------------------------------------------------------
    def update(self, msg: Update) -> None:
        eng = self.engine
        now = eng.clock.now()
        reason = eng.rounds.judge_update(msg.sender, msg.round, now)
        cur = eng.rounds.current
        if reason is not None:
            log.info("dropped update from %s for round %s: %s", msg.sender, msg.round, reason.value)
            if cur is not None and reason is not DropReason.DUPLICATE and cur.selects(msg.sender):
                eng.device_dropped(cur, msg.sender, reason, msg.report)
            return
        if cur is None or not eng.aggregating:  # judge_update accepts only for an open round
            return
        if eng.admit(cur, msg, eng.global_state, now, staleness=None) is None:
            eng.rounds.unaccept(msg.sender)
            eng.rounds.fail(msg.sender)
        self._maybe_close_early()

    def device_error(self, device_id: str, round_idx: int | None, error: str) -> None:
        if round_idx == self.engine.round_index():
            self._errors[device_id] = error
            self.fail_device(device_id, DropReason.DEVICE_ERROR)

    def fail_device(self, device_id: str, reason: DropReason) -> None:
        eng = self.engine
        cur = eng.rounds.current
        if cur is not None and cur.selects(device_id) and device_id not in cur.received | cur.failed:
            eng.rounds.fail(device_id)
            cur.drop(reason)
            eng.device_dropped(cur, device_id, reason)
            self._maybe_close_early()

    def went_offline(self, device_id: str) -> None:
        self._maybe_close_early()

    # --- closing --------------------------------------------------------------------------------------------
    def deadline(self, cur: OpenRound) -> None:
        self._close_round()

    def closed(self, ok: bool) -> None:
        """Nothing: the next round starts from the engine's global model."""

    def _maybe_close_early(self) -> None:
        # Only a round that has its quorum closes before its deadline: fewer than min_updates close a round
        # only through its own timer, never through what one device sent (an error report, a status). The one
        # exception takes every selected device: all of them (at least min_updates) failed with the same error,
        # which no single device can make happen (each report is signed by its own device) and a retry after the
        # deadline would not cure (issue 29's fast failure).
        rounds = self.engine.rounds
        if rounds.all_in() and (rounds.quorum() or self._unanimous_error()):
            self._close_round()

    def _unanimous_error(self) -> bool:
        cur = self.engine.rounds.current
        if cur is None or len(cur.selected) < max(1, self.engine.args.min_updates):
            return False
        errors = {self._errors.get(d) for d in cur.selected}
        return len(errors) == 1 and None not in errors

    def _close_round(self) -> None:
        eng = self.engine
        cur = eng.rounds.current
        if cur is None:
            return
        t0 = time.perf_counter()
        ok = eng.rounds.quorum() and eng.has_accepted and eng.aggregate()
        eng.end_round(cur, ok, time.perf_counter() - t0)

    def missing(self, cur: OpenRound, accepted: list[Accepted]) -> None:
        got = {a.device_id for a in accepted}
        for d in cur.selected:
            if d not in got and d not in cur.failed:
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
