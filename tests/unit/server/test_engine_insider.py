"""An insider (one device with its own valid key) against the round engine: inflated sample counts, far
updates and messages meant to close a round early are bounded (server/robustness.py, docs/security.md)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from engine_harness import Harness, state

from fedpeft_edge.config import config_from_dict
from fedpeft_edge.protocol import DeviceErrorReport
from fedpeft_edge.server.robustness import NormBound, effective_train_args, is_robust, weight_cap
from fedpeft_edge.server.strategy import FedTrimmedAvg, build_strategy


def _evil(g: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: -4.0 * v for k, v in g.items()}  # the attack: -4 x the global model


def test_a_rejoin_cannot_raise_the_declared_count_and_the_cap_applies(tmp_path: Path) -> None:
    h = Harness(tmp_path, max_declared_samples=500)
    h.join("d1", "d2", samples=10)
    h.join("d3", samples=10**9)  # capped at its first join
    devs = h.engine.rounds.devices
    assert devs["d3"].declared_samples == 500
    h.clock.t += 1
    h.join("d1", samples=10**9)  # a re-join may not raise it
    assert devs["d1"].declared_samples == 10
    h.clock.t += 1
    h.join("d1", samples=4)  # ... but may lower it
    assert devs["d1"].declared_samples == 4


def test_the_declared_counts_survive_a_resume(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.join("d1", "d2", "d3", samples=10)
    for d in h.selected():
        h.update(d, 1, state(1))
    h.runlog.close()
    again = Harness(tmp_path, resume=True)
    again.join("d1", samples=10**9)
    assert again.engine.rounds.devices["d1"].declared_samples == 10


def test_weights_clip_at_the_lower_median_of_the_declared_counts(tmp_path: Path) -> None:
    assert weight_cap([10, 20, 10**9], 2.0) == 40 and weight_cap([10, 10**9], 2.0) == 20
    assert weight_cap([10, 20], None) is None and weight_cap([], 2.0) is None
    h = Harness(tmp_path, sample_weight_clip=2.0)
    h.join("d1", "d2", samples=10)
    h.join("d3", samples=1000)
    for i, d in enumerate(h.selected()):
        h.update(d, 1, state(i + 1), samples=1000 if d == "d3" else 10)
    rec = {r["device_id"]: r for r in h.records("device_round")}
    assert rec["d3"]["num_samples"] == 20 and rec["d3"]["declared_samples"] == 1000


def test_fewer_than_min_updates_close_only_at_the_deadline(tmp_path: Path) -> None:
    h = Harness(tmp_path, min_updates=3)
    h.join("d1", "d2", "d3")
    sel = h.selected()
    h.update(sel[0], 1, state(1))
    for d in sel[1:]:  # the insider's other identities report errors to close the round on one update
        h.send(DeviceErrorReport(sender=d, round=1, error="x"))
    assert not h.records("round") and h.engine.version == 0
    h.fire()
    assert h.records("round")[0]["status"] == "failed" and h.engine.version == 0


def test_robust_defaults_apply_where_the_run_is_provisioned(tmp_path: Path) -> None:
    (tmp_path / "k").write_text("x")
    secure = {"comm_args": {"require_signatures": True, "signing_key_file": str(tmp_path / "k"),
                            "peer_keys_dir": str(tmp_path)}}
    cfg = config_from_dict(secure)
    assert is_robust(cfg.train_args, True)
    t = effective_train_args(cfg)
    assert t.federated_optimizer == "FedTrimmedAvg" and t.sample_weight_clip == 2.0
    assert isinstance(build_strategy(t), FedTrimmedAvg)
    plain = config_from_dict({})
    assert effective_train_args(plain) == plain.train_args
    off = config_from_dict({**secure, "train_args": {"robust": False}})
    assert effective_train_args(off).federated_optimizer == "FedAvg"
    on = config_from_dict({"train_args": {"robust": True, "federated_optimizer": "FedMedian"}})
    assert effective_train_args(on).federated_optimizer == "FedMedian"


def test_the_norm_bound_is_derived_from_the_first_rounds_medians() -> None:
    b = NormBound(None, derive=True, rounds=2, factor=3.0)
    assert b.measuring and b.observe([1.0, 2.0, 100.0]) is None
    assert b.observe([1.0, 3.0]) == pytest.approx(3.0 * 2.0)
    assert b.observe([1000.0]) == pytest.approx(6.0)  # fixed once derived
    assert not NormBound(None, derive=False, rounds=2, factor=3.0).measuring
    assert NormBound(5.0, derive=True, rounds=2, factor=3.0).observe([100.0]) == 5.0


def test_an_insider_with_an_inflated_count_cannot_steer_a_robust_round(tmp_path: Path) -> None:
    """The issue's attack at n = 3: -4 x the global model with 1e9 samples; robust mode keeps the round within
    the honest updates' range, plain FedAvg is carried away."""
    g = state(0)
    results = {}
    for mode in ("off", "on"):
        h = Harness(tmp_path / mode, sample_weight_clip=2.0 if mode == "on" else None,
                    federated_optimizer="FedTrimmedAvg" if mode == "on" else "FedAvg")
        h.join("d1", "d2", samples=10)
        h.join("evil", samples=10**9)
        for i, d in enumerate(h.selected()):
            h.update(d, 1, _evil(g) if d == "evil" else state(i + 1), samples=10**9 if d == "evil" else 10)
        results[mode] = h.engine.global_state
    honest = [state(i + 1) for i in range(2)]
    for k in g:
        lo = torch.minimum(honest[0][k], honest[1][k]) - 1e-6
        hi = torch.maximum(honest[0][k], honest[1][k]) + 1e-6
        assert bool(((results["on"][k] >= lo) & (results["on"][k] <= hi)).all())
        assert torch.allclose(results["off"][k], -4.0 * g[k], atol=1e-3)  # FedAvg: the insider's model


def test_a_robust_engine_derives_the_bound_then_clips_and_keeps_it_across_resume(tmp_path: Path) -> None:
    h = Harness(tmp_path, robust=True, norm_bound_rounds=1, norm_bound_factor=2.0, comm_round=4)
    h.join("d1", "d2", "d3")
    g = state(0)
    for i, d in enumerate(h.selected()):
        h.update(d, 1, {k: v + 0.1 * (i + 1) for k, v in g.items()})
    bound = h.engine.admission.max_norm
    assert bound is not None and bound == pytest.approx(2.0 * 0.2 * 10 ** 0.5, rel=1e-4)
    g1 = h.engine.global_state
    sel = h.selected()
    h.update(sel[0], 2, {k: v + 100.0 for k, v in g1.items()})
    h.update(sel[1], 2, g1)
    h.update(sel[2], 2, g1)
    rec = next(r for r in h.records("device_round") if r["round"] == 2 and r["device_id"] == sel[0])
    assert rec["norm_action"] == "clipped"
    h.runlog.close()
    again = Harness(tmp_path, resume=True, robust=True, norm_bound_rounds=1, comm_round=4)
    assert again.engine.admission.max_norm == pytest.approx(bound)
