"""The round engine's injected interfaces (clock, timers, run log, checkpoints, evaluation, traffic), with the
implementations the server program uses; tests pass their own clock and timer scheduler."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import torch

from fedpeft_edge.metering.bandwidth import BandwidthMeter, transfer_seconds
from fedpeft_edge.peft.base import Manifest
from fedpeft_edge.protocol import Timer
from fedpeft_edge.records import Record
from fedpeft_edge.server.checkpoint import Checkpoint, latest_round, load_checkpoint, save_checkpoint


class Clock(Protocol):
    def now(self) -> float:
        """Wall-clock seconds (time.time()): deadlines travel to devices in this clock."""


class TimerScheduler(Protocol):
    def schedule(self, delay_s: float, timer: Timer) -> None:
        """Deliver `timer` back to the engine (as an event) after delay_s."""

    def cancel_all(self) -> None:
        """Forget every pending timer (the run is over)."""


class RunLogWriter(Protocol):
    def write(self, kind: str, **fields: Any) -> dict[str, Any]:
        """Append one record (buffered; no fsync per record)."""

    def append(self, record: Record) -> dict[str, Any]:
        """Append one typed record (fedpeft_edge/records.py)."""

    def sync(self) -> None:
        """Make what was written durable (called once per round and at the end)."""

    def truncate_after(self, last_round: int) -> None:
        """Drop records of rounds after last_round (a resumed run continues from its checkpoint)."""

    def write_summary(self, summary: dict[str, Any]) -> Any:
        """Write summary.json."""

    def records(self, kind: str | None = None) -> list[dict[str, Any]]:
        """The records written so far (of one kind)."""


class CheckpointStore(Protocol):
    def save(self, round_idx: int, state: Mapping[str, torch.Tensor], strategy_state: Mapping[str, torch.Tensor],
             extra: Mapping[str, Any]) -> None:
        """Persist a completed round."""

    def load(self) -> Checkpoint | None:
        """The latest checkpoint, or None when no round completed yet."""


class Evaluator(Protocol):
    @property
    def available(self) -> bool:
        """False when the server has no test set (devices then evaluate)."""

    def evaluate(self, state: Mapping[str, torch.Tensor]) -> dict[str, Any] | None:
        """{loss, top1, samples} of the global tensors on the server's test set."""


@dataclasses.dataclass(frozen=True)
class DeviceTraffic:
    """One device's metered MQTT traffic in one round."""

    bytes_down: int = 0
    bytes_up: int = 0
    msgs_down: int = 0
    msgs_up: int = 0
    download_s: float | None = None  # longest server -> device transfer (when the device did not report one)


class Traffic(Protocol):
    def device(self, round_idx: int, device_id: str) -> DeviceTraffic: ...

    def upload_seconds(self, round_idx: int, device_id: str, msg_id: str | None, sent_at: float | None
                       ) -> float | None: ...

    def round_bytes(self, round_idx: int) -> tuple[int, int]:
        """(bytes down, bytes up) of a round."""

    def forget(self, up_to_round: int) -> None: ...


# --- implementations ----------------------------------------------------------------------------------------
class SystemClock:
    def now(self) -> float:
        return time.time()


class ThreadTimers:
    """threading.Timer per timer; `post` (e.g. the comm manager's post_local) puts the timer on the receive loop,
    so the engine sees it on the same thread as every message. `bind(post)` sets it once the manager exists."""

    def __init__(self, post: Callable[[Timer], None] | None = None) -> None:
        self._post = post
        self._timers: list[threading.Timer] = []
        self._lock = threading.Lock()

    def bind(self, post: Callable[[Timer], None]) -> None:
        self._post = post

    def _fire(self, timer: Timer) -> None:
        if self._post is not None:
            self._post(timer)

    def schedule(self, delay_s: float, timer: Timer) -> None:
        t = threading.Timer(max(0.0, delay_s), self._fire, args=(timer,))
        t.daemon = True
        with self._lock:
            self._timers = [x for x in self._timers if x.is_alive()]
            self._timers.append(t)
        t.start()

    def cancel_all(self) -> None:
        with self._lock:
            for t in self._timers:
                t.cancel()
            self._timers.clear()


class MeterTraffic:
    """Traffic read from a BandwidthMeter (indexed by round and peer: O(1) in the number of devices)."""

    def __init__(self, meter: BandwidthMeter) -> None:
        self.meter = meter

    def device(self, round_idx: int, device_id: str) -> DeviceTraffic:
        recs = self.meter.transfers(round=round_idx, peer=device_id)
        sent = [t for t in recs if t.sent]
        got = [t for t in recs if not t.sent]
        return DeviceTraffic(sum(t.mqtt_bytes for t in sent), sum(t.mqtt_bytes for t in got), len(sent), len(got),
                             max((t.duration_s for t in sent), default=None))

    def upload_seconds(self, round_idx: int, device_id: str, msg_id: str | None, sent_at: float | None
                       ) -> float | None:
        mine = [t for t in self.meter.transfers(round=round_idx, peer=device_id) if t.msg_id == msg_id]
        return transfer_seconds(mine, sent_at)

    def round_bytes(self, round_idx: int) -> tuple[int, int]:
        recs = self.meter.transfers(round=round_idx)
        return sum(t.mqtt_bytes for t in recs if t.sent), sum(t.mqtt_bytes for t in recs if not t.sent)

    def forget(self, up_to_round: int) -> None:
        self.meter.forget(up_to_round=up_to_round)


class DirCheckpoints:
    """Checkpoints in a run directory (server/checkpoint.py's safetensors layout)."""

    def __init__(self, run_dir: str | Path, manifest: Manifest, fingerprint: str, run_id: str) -> None:
        self.run_dir = Path(run_dir)
        self.manifest = manifest
        self.fingerprint = fingerprint
        self.run_id = run_id

    def save(self, round_idx: int, state: Mapping[str, torch.Tensor], strategy_state: Mapping[str, torch.Tensor],
             extra: Mapping[str, Any]) -> None:
        save_checkpoint(self.run_dir, round_idx, state, manifest_json=self.manifest.to_json(),
                        manifest_hash=self.manifest.hash, fingerprint=self.fingerprint, run_id=self.run_id,
                        strategy_state=strategy_state, extra=extra)

    def load(self) -> Checkpoint | None:
        if latest_round(self.run_dir) is None:
            return None
        return load_checkpoint(self.run_dir)
