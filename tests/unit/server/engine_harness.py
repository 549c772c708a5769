"""A round engine with no broker: a settable clock, timers fired by hand, a real run log and checkpoints."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from fedpeft_edge.config import TrainArgs
from fedpeft_edge.metering.bandwidth import BandwidthMeter
from fedpeft_edge.peft.base import Manifest, TensorSpec
from fedpeft_edge.protocol import Join, ProtocolMessage, RoundTask, Timer, Update
from fedpeft_edge.server.engine import RoundEngine, RunSpec
from fedpeft_edge.server.ports import DirCheckpoints, MeterTraffic
from fedpeft_edge.server.rounds import RoundController
from fedpeft_edge.server.runlog import RunLog, read_metrics
from fedpeft_edge.server.strategy import build_strategy
from fedpeft_edge.server.sync_rounds import Replies, SyncRounds
from fedpeft_edge.wire.codec import encode_tensors


def six_devices(**kw: object) -> RoundController:
    """A round controller of 6 admitted, online devices, 3 per round, a quorum of 2 (`kw`: more TrainArgs)."""
    args = TrainArgs(client_num_in_total=6, client_num_per_round=3, min_devices=3, min_updates=2,
                     round_timeout_s=10.0, comm_round=3, **kw)  # type: ignore[arg-type]
    rc = RoundController(args, seed=7)
    for i in range(6):
        rc.admit(f"dev{i}", accepted=True, exhausted=False)
        rc.set_online(f"dev{i}", True)
    return rc


MANIFEST = Manifest("bias", (TensorSpec("a.bias", (4,), "float32"), TensorSpec("head.weight", (2, 3), "float32")))
FINGERPRINT = "f" * 64


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def now(self) -> float:
        return self.t


class HandTimers:
    """Keeps scheduled timers; the test fires them (in due order) by advancing the clock."""

    def __init__(self) -> None:
        self.pending: list[tuple[float, Timer]] = []
        self.cancelled = False

    def schedule(self, delay_s: float, timer: Timer) -> None:
        self.pending.append((delay_s, timer))

    def cancel_all(self) -> None:
        self.pending.clear()
        self.cancelled = True


class NoEvaluator:
    available = False

    def evaluate(self, state: Mapping[str, torch.Tensor]) -> dict[str, Any] | None:
        return None


def state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {s.name: torch.randn(s.shape, generator=g) for s in MANIFEST.tensors}


class Harness:
    """Drives one engine; `out` collects everything it asked to send."""

    def __init__(self, run_dir: Path, resume: bool = False, checkpoints: Any = None,
                 model_delivery: str = "per_device", robust: bool = False, **train: Any) -> None:
        args: dict[str, Any] = dict(client_num_in_total=4, client_num_per_round=3, comm_round=3, min_devices=3,
                                    min_updates=2, round_timeout_s=10.0, join_timeout_s=30.0)
        args.update(train)
        self.args = TrainArgs(**args)
        self.run_dir = run_dir
        self.clock = FakeClock()
        self.timers = HandTimers()
        self.runlog = RunLog(run_dir)
        spec = RunSpec(self.args, seed=5, run_id="t", manifest=MANIFEST, fingerprint=FINGERPRINT, num_classes=10,
                       model_delivery=model_delivery, robust=robust)
        self.engine = RoundEngine(
            spec, state(0), build_strategy(self.args), clock=self.clock, timers=self.timers, runlog=self.runlog,
            checkpoints=checkpoints or DirCheckpoints(run_dir, MANIFEST, FINGERPRINT, "t"),
            evaluator=NoEvaluator(), traffic=MeterTraffic(BandwidthMeter()),
        )
        if resume:
            self.engine.resume()
        self.out: list[ProtocolMessage] = list(self.engine.start())

    def send(self, event: ProtocolMessage) -> list[ProtocolMessage]:
        got = self.engine.handle(event)
        self.out.extend(got)
        return got

    def join(self, *devices: str, samples: int = 10) -> None:
        for d in devices:
            self.send(Join(sender=d, backbone_fingerprint=FINGERPRINT, manifest_hash=MANIFEST.hash,
                           num_samples=samples))

    def tasks(self) -> list[RoundTask]:
        return [m for m in self.out if isinstance(m, RoundTask)]

    def last_tasks(self) -> dict[str, RoundTask]:
        return {t.receiver: t for t in self.tasks()}

    def update(self, device: str, round_idx: int, tensors: dict[str, torch.Tensor], samples: int = 10,
               **kw: Any) -> list[ProtocolMessage]:
        blob = encode_tensors(tensors, MANIFEST, "fp32")
        return self.send(Update(sender=device, round=round_idx, num_samples=samples, blob=blob, **kw))

    def fire(self, name: str = "deadline") -> list[ProtocolMessage]:
        """Advance the clock past the latest pending timer of that name and deliver it."""
        for delay, timer in reversed(self.timers.pending):
            if timer.name == name:
                self.timers.pending.remove((delay, timer))
                self.clock.t += delay + 0.001
                return self.send(timer)
        raise AssertionError(f"no pending {name} timer in {self.timers.pending}")

    def records(self, kind: str) -> list[dict[str, Any]]:
        self.runlog.sync()
        return read_metrics(self.run_dir, kind)

    def replies(self) -> Replies | None:
        """The open synchronous round's replies (who is in, failed, still waited for)."""
        policy = self.engine.policy
        assert isinstance(policy, SyncRounds), policy
        return policy.replies

    def selected(self) -> list[str]:
        cur = self.engine.rounds.current
        return list(cur.selected) if cur else []


def with_args(h: Harness, **kw: Any) -> TrainArgs:
    return dataclasses.replace(h.args, **kw)
