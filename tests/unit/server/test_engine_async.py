"""Asynchronous (FedBuff-style) rounds: busy devices, staleness weighting, the staleness bound."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from engine_harness import Harness, state

from fedpeft_edge.protocol import RoundTask


def _async(tmp_path: Path, **kw: Any) -> Harness:
    args: dict[str, Any] = dict(round_mode="async", client_num_per_round=3, async_buffer_size=2,
                                max_staleness=1, min_devices=3, min_updates=1, comm_round=5)
    args.update(kw)
    h = Harness(tmp_path, **args)
    h.join("d1", "d2", "d3", samples=10)
    return h


def _task(h: Harness, device: str) -> RoundTask:
    return [t for t in h.tasks() if t.receiver == device][-1]


def test_devices_are_kept_busy_and_handed_the_model_as_soon_as_they_report(tmp_path: Path) -> None:
    h = _async(tmp_path)
    first = {t.receiver: t for t in h.tasks()}
    assert set(first) == {"d1", "d2", "d3"} and all(t.mode == "async" and t.model_version == 0
                                                     for t in first.values())
    h.update("d1", first["d1"].round, state(1), model_version=0)
    again = _task(h, "d1")
    assert again.task_number != first["d1"].task_number and again.model_version == 0  # buffer not full yet
    h.update("d2", first["d2"].round, state(2), model_version=0)
    assert h.engine.version == 1  # two updates = one aggregation = one round
    assert _task(h, "d2").model_version == 1  # reported into the aggregation: gets the new model
    rnd = h.records("round")[0]
    assert rnd["mode"] == "async" and rnd["accepted"] == 2


def test_staleness_weights_the_delta_and_is_recorded(tmp_path: Path) -> None:
    h = _async(tmp_path)
    g0 = {k: v.clone() for k, v in h.engine.global_state.items()}
    t = {x.receiver: x for x in h.tasks()}
    h.update("d1", t["d1"].round, state(1), model_version=0)
    h.update("d2", t["d2"].round, state(2), model_version=0)
    g1 = {k: v.clone() for k, v in h.engine.global_state.items()}
    for k in g0:  # fresh updates: the plain sample-weighted mean
        want = (state(1)[k].double() + state(2)[k].double()) / 2
        assert torch.allclose(g1[k].double(), want, atol=1e-6)
    # d3 trained on version 0 and reports now, at version 1: staleness 1, weight 1/sqrt(2)
    h.update("d3", t["d3"].round, state(3), model_version=0)
    t1 = _task(h, "d1")
    h.update("d1", t1.round, state(4), model_version=t1.model_version)
    assert h.engine.version == 2
    for k in g0:
        d3 = state(3)[k].double() - g0[k].double()
        d1 = state(4)[k].double() - g1[k].double() if t1.model_version == 1 else state(4)[k].double() - g0[k].double()
        w1 = 1.0 if t1.model_version == 1 else 1 / math.sqrt(2)
        want = g1[k].double() + 0.5 * (d3 / math.sqrt(2)) + 0.5 * (d1 * w1)
        assert torch.allclose(h.engine.global_state[k].double(), want, atol=1e-5)
    recs = {r["device_id"]: r for r in h.records("device_round") if r["round"] == 2}
    assert recs["d3"]["staleness"] == 1 and abs(recs["d3"]["staleness_weight"] - 1 / math.sqrt(2)) < 1e-9


def test_updates_staler_than_max_staleness_are_dropped(tmp_path: Path) -> None:
    h = _async(tmp_path, max_staleness=0)
    t = {x.receiver: x for x in h.tasks()}
    h.update("d1", t["d1"].round, state(1), model_version=0)
    h.update("d2", t["d2"].round, state(2), model_version=0)  # version 1 now
    before = {k: v.clone() for k, v in h.engine.global_state.items()}
    h.update("d3", t["d3"].round, state(3), model_version=0)  # staleness 1 > 0
    rec = [r for r in h.records("device_round") if r["device_id"] == "d3"][-1]
    assert rec["drop_reason"] == "too_stale" and rec["staleness"] == 1
    assert all(torch.equal(before[k], h.engine.global_state[k]) for k in before)
    assert _task(h, "d3").model_version == 1  # and it is handed the current model


def test_async_run_ends_after_comm_round_aggregations(tmp_path: Path) -> None:
    h = _async(tmp_path, comm_round=2, async_buffer_size=1)
    for _ in range(4):
        if h.engine.finished:
            break
        t = h.tasks()[-1]
        h.update(t.receiver, t.round, state(7), model_version=t.model_version)
    assert h.engine.finished and h.engine.version == 2
