"""Server CPU per accepted update in the round engine (no broker) at 100, 300 and 1000 devices per round.

Each update is a real encoded blob of EfficientNet-Lite0's bias-update size (about 220 KB fp32); the engine
decodes it, checks its norm, adds it to the running FedAvg sums and writes its records. Per-update cost should
not grow with the number of devices (issue 13: target at most 2 ms per update at 1000 devices).
`--round-mode async` runs the FedBuff policy instead (buffer = devices per round, so every update after the first
round is one version stale and enters as a weighted delta); the target is the synchronous one.
`--max-update-norm` bounds every update's norm (measured per update, as in a provisioned run's robust default).

    python benchmarks/bench_engine.py [--devices 100 300 1000] [--round-mode sync|async] [--max-update-norm X]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch

from fedpeft_edge.config import TrainArgs
from fedpeft_edge.metering.bandwidth import BandwidthMeter
from fedpeft_edge.peft.base import Manifest, TensorSpec
from fedpeft_edge.protocol import Join, RoundTask, Timer, Update
from fedpeft_edge.server.engine import RoundEngine, RunSpec
from fedpeft_edge.server.ports import DirCheckpoints, MeterTraffic
from fedpeft_edge.server.runlog import RunLog
from fedpeft_edge.server.strategy import build_strategy
from fedpeft_edge.wire.codec import encode_tensors

TARGET_MS = 2.0


class _Clock:
    def __init__(self) -> None:
        self.t = 1.0e9

    def now(self) -> float:
        return self.t


class _Timers:
    def schedule(self, delay_s: float, timer: Timer) -> None:
        pass

    def cancel_all(self) -> None:
        pass


class _NoEval:
    available = False

    def evaluate(self, state: Mapping[str, torch.Tensor]) -> dict[str, Any] | None:
        return None


def _manifest(floats: int, tensors: int) -> Manifest:
    per = floats // tensors
    return Manifest("bias", tuple(TensorSpec(f"blocks.{i}.bias", (per,), "float32") for i in range(tensors)))


def run(devices: int, manifest: Manifest, blob: bytes, rounds: int,
        round_mode: Literal["sync", "async"] = "sync", max_update_norm: float | None = None) -> list[float]:
    """Seconds of engine work per accepted update, one figure per round."""
    args = TrainArgs(client_num_in_total=devices, client_num_per_round=devices, comm_round=rounds,
                     min_devices=devices, min_updates=1, round_timeout_s=1e6, round_mode=round_mode,
                     async_buffer_size=devices, max_update_norm=max_update_norm)
    with tempfile.TemporaryDirectory() as tmp:
        engine = RoundEngine(
            RunSpec(args, 0, "bench", manifest, "f" * 64), {s.name: torch.zeros(s.shape) for s in manifest.tensors},
            build_strategy(args), clock=_Clock(), timers=_Timers(), runlog=RunLog(Path(tmp)),
            checkpoints=DirCheckpoints(tmp, manifest, "f" * 64, "bench"), evaluator=_NoEval(),
            traffic=MeterTraffic(BandwidthMeter()),
        )
        engine.start()
        out = []
        for i in range(devices):
            out += engine.handle(Join(sender=f"d{i}", backbone_fingerprint="f" * 64, manifest_hash=manifest.hash,
                                      num_samples=100))
        per_update = []
        for _ in range(rounds):
            tasks = [m for m in out if isinstance(m, RoundTask)]
            out = []
            t0 = time.process_time()
            for task in tasks:
                out += engine.handle(Update(sender=task.receiver, round=task.round, num_samples=100, blob=blob))
            per_update.append((time.process_time() - t0) / max(len(tasks), 1))
        return per_update


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--devices", type=int, nargs="+", default=[100, 300, 1000])
    parser.add_argument("--floats", type=int, default=55_000, help="update size in fp32 values (220 KB)")
    parser.add_argument("--tensors", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--round-mode", choices=["sync", "async"], default="sync")
    parser.add_argument("--max-update-norm", type=float, default=None,
                        help="a norm bound: every update's norm measured (the bench's update has norm ~234 from a zero "
                             "global model: a bound below it clips every update)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    manifest = _manifest(args.floats, args.tensors)
    g = torch.Generator().manual_seed(0)
    blob = bytes(encode_tensors({s.name: torch.randn(s.shape, generator=g) for s in manifest.tensors}, manifest))
    print(f"engine CPU per accepted update ({len(blob) / 1e3:.0f} KB fp32 update, {args.tensors} tensors; "
          f"median over {args.rounds} rounds; {args.round_mode} rounds; norm bound {args.max_update_norm};\n"
          f"  target <= {TARGET_MS:g} ms at 1000 devices)")
    base = None
    for n in args.devices:
        ms = statistics.median(run(n, manifest, blob, args.rounds, args.round_mode, args.max_update_norm)) * 1e3
        base = base or ms
        verdict = "" if n != 1000 else ("  MET" if ms <= TARGET_MS else "  MISSED")
        print(f"  {n:5d} devices/round: {ms:7.3f} ms/update  ({ms / base:4.2f}x the {args.devices[0]}-device "
              f"figure){verdict}")


if __name__ == "__main__":
    main()
