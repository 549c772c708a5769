"""Round bookkeeping both round policies share: the devices the server knows (admitted, online, budget left),
which of them may be sampled, the seeded sample of each round, and the round's index and retry.

Pure logic with no I/O, so the server app, tests and simulations share it. Sampling is a function of
(seed, round, retry) and the sorted eligible devices, so a resumed server samples exactly as before. A round's
`retry` counts its failed attempts (0 the first time); run records call it `attempt`. Which update counts and
when a round closes is its policy's (server/sync_rounds.py, server/async_rounds.py).
"""

from __future__ import annotations

import collections
import dataclasses
import math
from collections import Counter
from typing import Any

import numpy as np

from fedpeft_edge.config import TrainArgs
from fedpeft_edge.drops import DropReason

__all__ = ["DropReason", "KnownDevice", "OpenRound", "RoundController"]


@dataclasses.dataclass
class KnownDevice:
    """What the server knows about one device (its join, presence, admission; not the device's own state). Its
    accepted/online/exhausted flags are read-only here: the `RoundController` sets them (`admit`, `set_online`,
    `mark_exhausted`) and keeps its eligible set with them."""

    device_id: str
    profile: dict[str, Any] = dataclasses.field(default_factory=dict)
    data_stats: dict[str, Any] = dataclasses.field(default_factory=dict)
    declared_samples: int = 0  # num_samples at join: updates may not claim more (robust aggregation)
    joins: collections.deque[float] = dataclasses.field(default_factory=collections.deque)  # recent join times
    joined_at: float = math.inf  # its last join (shared delivery: a model sent before it reached the device)
    resends: int = 0  # round tasks re-sent to it in the current round
    _accepted: bool = dataclasses.field(default=False, repr=False)
    _online: bool = dataclasses.field(default=False, repr=False)
    _exhausted: bool = dataclasses.field(default=False, repr=False)  # privacy budget spent: never sampled again
    _muted: bool = dataclasses.field(default=False, repr=False)  # flooding: its topics are shed for a while

    @property
    def accepted(self) -> bool:
        return self._accepted

    @property
    def online(self) -> bool:
        return self._online

    @property
    def exhausted(self) -> bool:
        return self._exhausted

    @property
    def muted(self) -> bool:
        return self._muted

    @property
    def eligible(self) -> bool:
        """May be sampled: admitted, online, privacy budget left, not shed for flooding."""
        return self._accepted and self._online and not self._exhausted and not self._muted


@dataclasses.dataclass
class OpenRound:
    """The round in progress."""

    index: int
    retry: int  # failed attempts of this round before this one (records name it `attempt`)
    selected: tuple[str, ...]
    opened_at: float
    deadline: float
    dropped: Counter[str] = dataclasses.field(default_factory=Counter)  # {DropReason value: count}: see drop()
    _chosen: frozenset[str] = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._chosen = frozenset(self.selected)  # membership per message in O(1), not a scan of `selected`

    def selects(self, device_id: str) -> bool:
        """Whether device_id was sampled for this round."""
        return device_id in self._chosen

    def drop(self, reason: DropReason) -> None:
        """Count one update this round did not aggregate: the one place a round's `dropped` counter grows."""
        self.dropped[DropReason(reason).value] += 1


class RoundController:
    """Knows the devices and samples the rounds; the engine and its round policy do the rest."""

    def __init__(self, train_args: TrainArgs, seed: int, next_round: int = 1) -> None:
        self._args = train_args
        self._seed = seed
        self.next_round = next_round
        self.devices: dict[str, KnownDevice] = {}
        # Kept as flags change, so that a join or a presence costs O(1), not a scan of every device:
        self._eligible: set[str] = set()  # admitted, online, budget left
        self._eligible_sorted: tuple[str, ...] | None = ()  # sampling's order, sorted once per change
        self._admitted: set[str] = set()
        self._spent: set[str] = set()  # admitted with the privacy budget spent
        self._present: set[str] = set()  # admitted and online
        self.current: OpenRound | None = None
        self._retry = 0
        self._started = False
        self.join_timed_out = False  # train_args.join_timeout_s passed: start with the devices that joined

    # --- devices ---------------------------------------------------------------------------------------
    def device(self, device_id: str) -> KnownDevice:
        return self.devices.setdefault(device_id, KnownDevice(device_id))

    def admit(self, device_id: str, accepted: bool, exhausted: bool) -> KnownDevice:
        """A join was judged: the device is admitted (or refused), with its privacy budget spent or not."""
        dev = self.device(device_id)
        dev._accepted, dev._exhausted = accepted, exhausted
        self._refresh(dev)
        return dev

    def mark_exhausted(self, device_id: str) -> None:
        """The device spent its privacy budget: never sampled again."""
        dev = self.device(device_id)
        dev._exhausted = True
        self._refresh(dev)

    def set_muted(self, device_id: str, muted: bool) -> None:
        """The transport stopped (or started again) hearing a flooding device: not sampled meanwhile."""
        dev = self.device(device_id)
        dev._muted = muted
        self._refresh(dev)

    def set_online(self, device_id: str, online: bool) -> None:
        """Presence changed (a join, or the broker's report)."""
        dev = self.device(device_id)
        dev._online = online
        self._refresh(dev)

    def _refresh(self, dev: KnownDevice) -> None:
        name = dev.device_id
        for group, member in ((self._eligible, dev.eligible), (self._admitted, dev.accepted),
                              (self._spent, dev.accepted and dev.exhausted),
                              (self._present, dev.accepted and dev.online)):
            if member:
                group.add(name)
            else:
                group.discard(name)
        self._eligible_sorted = None

    def eligible(self) -> tuple[str, ...]:
        """The devices that may be sampled, sorted (sampling's order): sorted once after a change, not per call."""
        if self._eligible_sorted is None:
            self._eligible_sorted = tuple(sorted(self._eligible))
        return self._eligible_sorted

    def eligible_count(self) -> int:
        return len(self._eligible)

    def online_count(self) -> int:
        """Admitted devices online now."""
        return len(self._present)

    def can_open(self) -> bool:
        """min_devices must be online for this server's first round (also after a resume); later rounds need
        only min_updates of them, so a device that drops out does not stall the run."""
        need = self._args.min_updates if self._started or self.join_timed_out else self._args.min_devices
        return self.current is None and len(self._eligible) >= need

    def all_spent(self) -> bool:
        """Every admitted device has spent its privacy budget: no round can ever run again."""
        return bool(self._admitted) and len(self._spent) == len(self._admitted)

    @property
    def retry(self) -> int:
        """The retry the next (or current) round runs as: 0, then 1, 2 ... after failed attempts."""
        return self._retry

    @property
    def started(self) -> bool:
        return self._started

    @property
    def finished(self) -> bool:
        return self.next_round > self._args.comm_round

    # --- rounds ----------------------------------------------------------------------------------------
    def open_round(self, now: float) -> OpenRound:
        """Sample this round's devices (seeded by seed, round and retry) and start its deadline."""
        pool = self.eligible()
        k = min(self._args.client_num_per_round, len(pool))
        rng = np.random.default_rng([self._seed, self.next_round, self._retry])
        chosen = sorted(pool[i] for i in rng.choice(len(pool), size=k, replace=False))
        self._started = True
        for d in chosen:
            self.devices[d].resends = 0
        self.current = OpenRound(
            index=self.next_round,
            retry=self._retry,
            selected=tuple(chosen),
            opened_at=now,
            deadline=now + self._args.round_timeout_s,
        )
        return self.current

    def close_round(self, aggregated: bool) -> OpenRound:
        """End the open round; an aggregated round advances the index, a failed one is retried."""
        if self.current is None:
            raise RuntimeError("close_round() without an open round")
        closed = self.current
        self.current = None
        if aggregated:
            self.next_round += 1
            self._retry = 0
        else:
            self._retry += 1
        return closed
