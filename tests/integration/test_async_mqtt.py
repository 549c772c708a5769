"""Asynchronous rounds over a real mosquitto: a 5x slower device does not hold the rounds back, and its stale
updates are aggregated with their staleness recorded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fl_processes import Procs, aggregated_rounds, records, run_dir_of, wait_for, write_config

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


def test_async_rounds_close_at_the_fast_devices_pace(mosquitto_broker: Any, tmp_path: Path, procs: Procs) -> None:
    train = {"round_mode": "async", "client_num_in_total": 3, "client_num_per_round": 3, "min_devices": 3,
             "min_updates": 1, "async_buffer_size": 2, "max_staleness": 12, "comm_round": 10, "max_steps": 20,
             "round_timeout_s": 60}
    device = {"num_threads": 1, "measure_latency": False}
    cfg = write_config(tmp_path / "run.yaml", mosquitto_broker.port, "async", train_args=train,
                       device_args=device)
    slow = write_config(tmp_path / "slow.yaml", mosquitto_broker.port, "async", train_args=train,
                        device_args={**device, "slowdown_factor": 5.0})
    run_dir = run_dir_of(cfg)
    procs.server(cfg)
    procs.agent(cfg, "fast0", 0)
    procs.agent(cfg, "fast1", 1)
    procs.agent(slow, "slow", 2)
    wait_for("summary.json", (run_dir / "summary.json").exists, 200, procs)
    assert aggregated_rounds(run_dir) == list(range(1, 11))
    accepted = [r for r in records(run_dir, "device_round") if r["status"] == "accepted"]
    per_device = {d: [r for r in accepted if r["device_id"] == d] for d in ("fast0", "fast1", "slow")}
    counts = {d: len(rs) for d, rs in per_device.items()}
    # The rounds went on while the slow device trained: the fast ones contributed far more updates ...
    assert counts["fast0"] + counts["fast1"] >= 4 * max(counts["slow"], 1), counts
    # ... and the slow device's updates were still aggregated, stale, with the staleness and its weight recorded.
    assert counts["slow"] >= 1, counts
    stale = [r for r in per_device["slow"] if r["staleness"] >= 1]
    assert stale, per_device["slow"]
    assert all(abs(r["staleness_weight"] - (1 + r["staleness"]) ** -0.5) < 1e-9 for r in stale)
    opened = records(run_dir, "round_open")
    assert opened and all(o["mode"] == "async" for o in opened)
    assert all(p.wait(timeout=30) == 0 for name, p in procs.procs.items() if name != "server")
