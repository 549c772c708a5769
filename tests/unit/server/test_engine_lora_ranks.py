"""flexlora through the round engine: ranks from the join profile, per-device shapes on the wire, the product merge,
and a rank halved when a device's training takes too much of the deadline."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from engine_harness import FakeClock, HandTimers, NoEvaluator

from fedpeft_edge.config import LoraArgs, TrainArgs
from fedpeft_edge.metering.bandwidth import BandwidthMeter
from fedpeft_edge.peft.base import Manifest, TensorSpec
from fedpeft_edge.peft.lora.aggregation import LoraPair, product
from fedpeft_edge.peft.lora.ranks import LoraRankPlan, profile_memory, rank_for_memory
from fedpeft_edge.protocol import DeviceReport, Join, RoundTask, Update
from fedpeft_edge.server.engine import RoundEngine, RunSpec
from fedpeft_edge.server.ports import DirCheckpoints, MeterTraffic
from fedpeft_edge.server.runlog import RunLog, read_metrics
from fedpeft_edge.server.strategy import FedAvg
from fedpeft_edge.server.strategy.merge import with_plan
from fedpeft_edge.server.sync_rounds import SyncRounds
from fedpeft_edge.wire.codec import encode_tensors

MANIFEST = Manifest("lora", (TensorSpec("l.lora_A.weight", (4, 6), "float32"),
                             TensorSpec("l.lora_B.weight", (5, 4), "float32"),
                             TensorSpec("head.weight", (2, 3), "float32")))
PAIR = LoraPair("l.lora_A.weight", "l.lora_B.weight")
FP = "f" * 64
MEMORY = {"pi": 1024.0, "laptop": 4096.0, "orin": 65536.0}  # MB


def _engine(tmp_path: Path) -> tuple[RoundEngine, LoraRankPlan, HandTimers]:
    args = TrainArgs(client_num_in_total=3, client_num_per_round=3, comm_round=2, min_devices=3, min_updates=3,
                     round_timeout_s=10.0)
    plan = LoraRankPlan(MANIFEST, LoraArgs(r=4, rank_min=1, aggregation="flexlora"))
    g = torch.Generator().manual_seed(0)
    state = {s.name: torch.randn(s.shape, generator=g) for s in MANIFEST.tensors}
    timers = HandTimers()
    engine = RoundEngine(RunSpec(args, 5, "t", MANIFEST, FP), state, with_plan(FedAvg(), plan), clock=FakeClock(),
                         timers=timers, runlog=RunLog(tmp_path),
                         checkpoints=DirCheckpoints(tmp_path, MANIFEST, FP, "t"), evaluator=NoEvaluator(),
                         traffic=MeterTraffic(BandwidthMeter()), shapes=plan)
    engine.start()
    return engine, plan, timers


def test_rank_follows_memory_on_a_log_scale() -> None:
    bounds = (1024.0, 16384.0)
    assert [rank_for_memory(m, 1, 8, bounds) for m in (512.0, 1024.0, 4096.0, 16384.0, 65536.0)] == [1, 1, 4, 8, 8]
    assert rank_for_memory(None, 2, 8, bounds) == 2
    assert profile_memory({"cuda_available": True, "cuda_mem_total_mb": 8000, "ram_total_mb": 2000}) == \
        (8000.0, "cuda_mem_total_mb")
    assert profile_memory({"ram_total_mb": 2000, "memory_emulated": True}) == (2000.0, "ram_total_mb, emulated")


def test_flexlora_round_gives_ranks_by_memory_and_merges_the_products(tmp_path: Path) -> None:
    engine, plan, timers = _engine(tmp_path)
    out = []
    for d, mb in MEMORY.items():
        out += engine.handle(Join(sender=d, backbone_fingerprint=FP, manifest_hash=MANIFEST.hash, num_samples=100,
                                  profile={"ram_total_mb": mb}))
    tasks = {m.receiver: m for m in out if isinstance(m, RoundTask)}
    assert {d: t.rank for d, t in tasks.items()} == {"pi": 1, "laptop": 2, "orin": 4}
    g = torch.Generator().manual_seed(1)
    sent, products, heads, replies = {}, [], [], []
    for i, d in enumerate(MEMORY):
        layout = plan.layout(d)
        local = layout.narrow({s.name: torch.randn(s.shape, generator=g) for s in MANIFEST.tensors})
        sent[d] = layout.manifest.nbytes
        blob = encode_tensors(local, layout.manifest, "fp32")
        report = DeviceReport(train_s=8.0 if d == "laptop" else 1.0)  # the laptop takes 80% of the deadline
        replies += engine.handle(Update(sender=d, round=1, num_samples=10 * (i + 1), blob=blob, report=report))
        products.append((10 * (i + 1), product(local[PAIR.a], local[PAIR.b])))
        heads.append((10 * (i + 1), local["head.weight"].double()))
    assert sent["pi"] < sent["laptop"] < sent["orin"]  # bytes on the wire follow the rank
    assert engine.version == 1
    n = sum(w for w, _ in products)
    mean = sum(w * p for w, p in products) / n
    s = torch.linalg.svdvals(mean)
    got = product(engine.global_state[PAIR.a], engine.global_state[PAIR.b])
    err = float(torch.linalg.matrix_norm(got - mean))
    assert err == pytest.approx(float(s[4:].square().sum().sqrt()), abs=1e-4)  # the best rank-4 approximation
    torch.testing.assert_close(engine.global_state["head.weight"], (sum(w * h for w, h in heads) / n).float())
    records = read_metrics(tmp_path, "assignment")
    at_join = {r["device_id"]: r for r in records if r["after_round"] is None}
    assert at_join["pi"]["rank"] == 1 and "1024 MB" in at_join["pi"]["reason"]
    later = [r for r in records if r["after_round"] == 1]
    assert [(r["device_id"], r["rank"]) for r in later] == [("laptop", 1)] and "deadline" in later[0]["reason"]
    round2 = {m.receiver: m.rank for m in replies if isinstance(m, RoundTask)}
    assert round2 == {"pi": 1, "laptop": 1, "orin": 4}


def test_an_update_at_another_rank_than_assigned_is_refused(tmp_path: Path) -> None:
    engine, plan, _ = _engine(tmp_path)
    for d, mb in MEMORY.items():
        engine.handle(Join(sender=d, backbone_fingerprint=FP, manifest_hash=MANIFEST.hash, num_samples=100,
                           profile={"ram_total_mb": mb}))
    full = {s.name: torch.zeros(s.shape) for s in MANIFEST.tensors}
    engine.handle(Update(sender="pi", round=1, num_samples=10, blob=encode_tensors(full, MANIFEST, "fp32"),
                         report=DeviceReport()))
    rep = engine.policy.replies if isinstance(engine.policy, SyncRounds) else None
    assert rep is not None and "pi" in rep.failed  # refused, not merged
