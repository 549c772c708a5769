"""Asynchronous rounds (`train_args.round_mode: async`, FedBuff-style).

Up to client_num_per_round devices are kept busy; each reporting device is handed the current global model at
once; every `async_buffer_size` accepted updates are aggregated into a new global version (one "round"). An
update trained on version tau and aggregated at version v has staleness s = v - tau; updates with
s > max_staleness are dropped (too_stale), the others enter as deltas from the model they trained on, weighted
by 1/sqrt(1+s) (polynomial staleness weighting, FedBuff / FedAsync): new = global + sum_k n_k/N * w(s_k) * delta_k.
Each task has its own number (`RoundTask.task_number`), so a device tells a new task from a re-sent one.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import torch

from fedpeft_edge.protocol import Update
from fedpeft_edge.server.records import Accepted
from fedpeft_edge.server.round_policy import EngineCore, RoundPolicy
from fedpeft_edge.server.rounds import DropReason, OpenRound

log = logging.getLogger(__name__)


@dataclasses.dataclass
class _Busy:
    """A device working on a task."""

    round: int
    version: int
    given_at: float


class AsyncRounds(RoundPolicy):
    """FedBuff over the engine's core: busy devices, a buffer of updates, global models kept for staleness."""

    name = "async"

    def __init__(self, engine: EngineCore) -> None:
        super().__init__(engine)
        self.traffic_rounds_kept = engine.args.max_staleness + 1  # a stale update's upload is still timed
        self._busy: dict[str, _Busy] = {}
        self._history: dict[int, dict[str, torch.Tensor]] = {}  # global version -> its model (for deltas)
        self._task_number = 0  # the number of the last task handed out

    # --- tasks ----------------------------------------------------------------------------------------------
    def open(self, cur: OpenRound, now: float) -> list[str]:
        eng = self.engine
        self._history.setdefault(eng.version, eng.global_state)
        self._fill(now)
        return sorted(self._busy)

    def joined(self, device_id: str, now: float) -> None:
        self._fill(now)

    def task_owed(self, device_id: str, cur: OpenRound) -> bool:
        return device_id in self._busy

    def resend(self, device_id: str, cur: OpenRound, now: float) -> None:
        self._give_task(device_id, now, full=True)

    def _fill(self, now: float) -> None:
        """Keep up to client_num_per_round devices busy (seeded choice among the idle eligible ones)."""
        eng = self.engine
        if eng.rounds.current is None or eng.finished:
            return
        free = eng.args.client_num_per_round - len(self._busy)
        if free <= 0:
            return
        idle = [d for d in eng.rounds.eligible() if d not in self._busy]
        rng = torch.Generator().manual_seed(eng.spec.seed * 1_000_003 + self._task_number)
        order = torch.randperm(len(idle), generator=rng).tolist()
        for i in order[:free]:
            self._give_task(idle[i], now)

    def _give_task(self, device_id: str, now: float, full: bool = False) -> None:
        eng = self.engine
        cur = eng.rounds.current
        if cur is None:
            return
        self._task_number += 1
        self._busy[device_id] = _Busy(cur.index, eng.version, now)
        eng.emit(eng.task(device_id, cur, now, task_number=self._task_number,
                          deadline=now + eng.args.round_timeout_s, full=full))

    # --- what devices send ----------------------------------------------------------------------------------
    def update(self, msg: Update) -> None:
        eng = self.engine
        now = eng.clock.now()
        cur = eng.rounds.current
        dev = eng.rounds.devices.get(msg.sender)
        busy = self._busy.get(msg.sender)
        reason: DropReason | None = None
        if dev is None or not dev.accepted:
            reason = DropReason.UNKNOWN_DEVICE
        elif cur is None or busy is None:
            reason = DropReason.NOT_SELECTED
        elif msg.round != busy.round or (msg.model_version is not None and msg.model_version != busy.version):
            reason = DropReason.STALE_ROUND  # an answer to an earlier task (re-sent after a reconnect)
        if reason is not None or cur is None or busy is None:
            log.info("dropped async update from %s for round %s: %s", msg.sender, msg.round, reason)
            if cur is not None and reason is not None:
                cur.drop(reason)
            return
        del self._busy[msg.sender]
        staleness = eng.version - busy.version
        if staleness > eng.args.max_staleness or busy.version not in self._history:
            cur.drop(DropReason.TOO_STALE)
            eng.device_dropped(cur, msg.sender, DropReason.TOO_STALE, msg.report, staleness=staleness)
        else:
            eng.admit(cur, msg, self._history[busy.version], now, staleness, task_round=busy.round)
            if eng.buffered >= eng.args.async_buffer_size:
                self._close(cur)
        if not eng.finished and eng.rounds.current is not None and dev is not None and dev.online \
                and not dev.exhausted and msg.sender not in self._busy \
                and len(self._busy) < eng.args.client_num_per_round:
            self._give_task(msg.sender, now)  # handed the newest global model as soon as it reported

    def device_error(self, device_id: str, round_idx: int | None, error: str) -> None:
        if round_idx == self.engine.round_index() or device_id in self._busy:
            self.fail_device(device_id, DropReason.DEVICE_ERROR)

    def fail_device(self, device_id: str, reason: DropReason) -> None:
        eng = self.engine
        cur = eng.rounds.current
        if self._busy.pop(device_id, None) is not None and cur is not None:
            cur.drop(reason)
            eng.device_dropped(cur, device_id, reason)
            self._fill(eng.clock.now())

    def came_online(self, device_id: str) -> None:
        """Nothing: a device gets a task when it joins (`joined`) or reports, not when its presence returns."""

    def went_offline(self, device_id: str) -> None:
        self._busy.pop(device_id, None)
        self._fill(self.engine.clock.now())

    # --- closing --------------------------------------------------------------------------------------------
    def _close(self, cur: OpenRound) -> None:
        """Aggregate the buffer into the next global version (one async round) and open the next one."""
        t0 = time.perf_counter()
        ok = self.engine.aggregate()
        self.engine.end_round(cur, ok, time.perf_counter() - t0)

    def closed(self, ok: bool) -> None:
        eng = self.engine
        if ok:
            self._history[eng.version] = eng.global_state
            for v in [v for v in self._history if v < eng.version - eng.args.max_staleness]:
                del self._history[v]

    def deadline(self, cur: OpenRound) -> None:
        """Aggregate what the buffer holds if it reaches min_updates; free devices that never answered."""
        eng = self.engine
        now = eng.clock.now()
        for d, b in list(self._busy.items()):
            if b.given_at + eng.args.round_timeout_s <= now:
                del self._busy[d]
                cur.drop(DropReason.NO_UPDATE)
                eng.device_dropped(cur, d, DropReason.NO_UPDATE)
        if eng.buffered >= max(1, eng.args.min_updates):
            self._close(cur)
            return
        # A failed attempt: the buffer is kept, the round re-armed (bounded by max_round_retries).
        eng.rounds.close_round(aggregated=False)
        try:
            eng.records.round(cur.index, cur.retry, False, sorted(self._busy), 0, dict(cur.dropped),
                              now - cur.opened_at, 0.0, None,
                              eng.rounds.online_count())
            eng.runlog.sync()
        except Exception:
            log.exception("recording async round %d failed; the run goes on", cur.index)
        eng.advance(cur, ok=False)

    def missing(self, cur: OpenRound, accepted: list[Accepted]) -> None:
        """Nothing: a device that never answered was dropped when its own task timed out (`deadline`)."""

    def ends_run(self, cur: OpenRound, ok: bool) -> bool:
        return False

    def recorded_selection(self, cur: OpenRound, accepted: list[Accepted]) -> list[str]:
        return [a.device_id for a in accepted]
