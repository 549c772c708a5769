"""What a round policy decides for the round engine: who gets a task and when, which update counts, when a round
closes. The engine (server/engine.py) keeps what both policies share: joins, presence, admission, aggregation,
records, checkpoints and the end of the run; it calls these hooks and nothing else of a policy.

Two policies: `sync_rounds.SyncRounds` (rounds with a deadline and a sampled set of devices) and
`async_rounds.AsyncRounds` (FedBuff: devices kept busy, every `async_buffer_size` updates aggregated). The
run's `train_args.round_mode` picks one when the engine is built (`engine.POLICIES`).
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from typing import Any, Protocol

import torch

from fedpeft_edge.config import TrainArgs
from fedpeft_edge.protocol import DeviceReport, ProtocolMessage, RoundTask, Update
from fedpeft_edge.server.ports import Clock, RunLogWriter
from fedpeft_edge.server.records import Accepted, RoundRecords
from fedpeft_edge.server.rounds import DropReason, OpenRound, RoundController


class EngineCore(Protocol):
    """What a policy uses of the engine's shared core (server/engine.py's RoundEngine implements it): the
    policies depend on this, not on the engine module, so no module imports its importer."""

    spec: Any
    args: TrainArgs
    global_state: dict[str, torch.Tensor]
    clock: Clock
    runlog: RunLogWriter
    rounds: RoundController
    records: RoundRecords
    finished: bool

    @property
    def version(self) -> int: ...

    @property
    def aggregating(self) -> bool: ...

    @property
    def buffered(self) -> int: ...

    def round_index(self) -> int | None: ...

    def emit(self, msg: ProtocolMessage) -> None: ...

    def device_dropped(self, cur: OpenRound, device_id: str, reason: DropReason, report: DeviceReport | None = None,
                       detail: str | None = None, **extra: Any) -> None: ...

    def task(self, device_id: str, cur: OpenRound, now: float, *, deadline: float, retry: int = 0,
             task_number: int = 0, full: bool = False) -> RoundTask: ...

    @property
    def has_accepted(self) -> bool: ...

    def admit(self, cur: OpenRound, msg: Update, base: Mapping[str, torch.Tensor], now: float,
              staleness: int | None, task_round: int | None = None) -> Accepted | None: ...

    def aggregate(self) -> bool: ...

    def end_round(self, cur: OpenRound, ok: bool, aggregate_s: float) -> None: ...

    def advance(self, cur: OpenRound, ok: bool) -> None: ...

    def finish(self, reason: str = "completed") -> None: ...


class RoundPolicy(abc.ABC):
    """One way to run rounds over the engine's shared core. A policy holds its own state (the sync policy which
    selected devices replied and the errors of the open attempt, the async one the busy devices and recent global
    models); everything it sends or records goes through the engine it was built with."""

    #: the round_mode it implements: written into round and round_open records and sent in each task
    name: str = ""
    #: how many closed rounds' traffic the meter keeps after a round closes (late uploads are still timed)
    traffic_rounds_kept: int = 0

    def __init__(self, engine: EngineCore) -> None:
        self.engine = engine

    @abc.abstractmethod
    def open(self, cur: OpenRound, now: float) -> list[str]:
        """A round opened (its deadline armed, its model encoded): hand out its tasks; returns the devices its
        round_open record names."""

    @abc.abstractmethod
    def joined(self, device_id: str, now: float) -> None:
        """An admitted device joined (after any task re-sent to it), before the engine tries to open a round."""

    @abc.abstractmethod
    def task_owed(self, device_id: str, cur: OpenRound) -> bool:
        """Whether a device that joined again during `cur` is still owed its task."""

    @abc.abstractmethod
    def resend(self, device_id: str, cur: OpenRound, now: float) -> None:
        """Send a device its task again, carrying the tensors (the re-send's rate limit is the engine's)."""

    @abc.abstractmethod
    def came_online(self, device_id: str) -> None:
        """A known device is online: it joined (admitted or refused) or its presence came back (the engine has
        recorded it)."""

    @abc.abstractmethod
    def went_offline(self, device_id: str) -> None:
        """An admitted device's presence went offline (the engine has recorded it)."""

    @abc.abstractmethod
    def update(self, msg: Update) -> None:
        """A device's update: judge it, let the engine admit it, close the round if it is complete."""

    @abc.abstractmethod
    def device_error(self, device_id: str, round_idx: int | None, error: str) -> None:
        """A known device reported that it failed a task for `round_idx` (the engine has recorded it)."""

    @abc.abstractmethod
    def fail_device(self, device_id: str, reason: DropReason) -> None:
        """A device can no longer deliver its update (an error, its privacy budget spent): stop waiting for it."""

    @abc.abstractmethod
    def deadline(self, cur: OpenRound) -> None:
        """The open round's (or attempt's) own deadline timer fired."""

    @abc.abstractmethod
    def closed(self, ok: bool) -> None:
        """The engine closed a round (aggregated if `ok`) and emptied its aggregation, before its records."""

    @abc.abstractmethod
    def missing(self, cur: OpenRound, accepted: list[Accepted]) -> None:
        """Record the devices the closed round waited for in vain (while its records are written)."""

    @abc.abstractmethod
    def recorded_selection(self, cur: OpenRound, accepted: list[Accepted]) -> list[str] | tuple[str, ...]:
        """The devices the closed round's record names as selected."""

    @abc.abstractmethod
    def ends_run(self, cur: OpenRound, ok: bool) -> bool:
        """After a round closed: True if this policy ended the run (the engine opens nothing more)."""
