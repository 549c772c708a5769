"""LoRA aggregation modes over MQTT with real server and agent processes: ffa sends no A and keeps it frozen;
flexlora gives each agent the rank its (emulated) memory allows, and each agent's update is that rank's size."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from fl_processes import Procs, aggregated_rounds, records, run_dir_of, wait_for, write_config

from fedpeft_edge.server.checkpoint import load_checkpoint

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(420)]


@pytest.fixture
def procs(tmp_path: Path):  # type: ignore[no-untyped-def]
    p = Procs(tmp_path / "logs")
    yield p
    p.stop_all()


def test_ffa_and_flexlora_runs_over_mqtt(mosquitto_broker: Any, tmp_path: Path, procs: Procs) -> None:
    runs = {}
    for mode in ("ffa", "flexlora"):
        cfg = write_config(
            tmp_path / f"{mode}.yaml", mosquitto_broker.port, f"lora-{mode}",
            peft_args={"method": "lora", "lora": {"r": 4, "alpha": 8, "aggregation": mode, "rank_min": 1}},
            train_args={"comm_round": 2, "client_num_in_total": 2, "client_num_per_round": 2, "min_devices": 2,
                        "min_updates": 2, "max_steps": 2},
            device_args={"num_threads": 1, "measure_latency": False, "emulate_memory_mb": [1024.0, 65536.0],
                         "state_dir": str(tmp_path / "state" / mode)},
        )
        runs[mode] = run_dir_of(cfg)
        procs.server(cfg, name=f"server-{mode}")
        for i in range(2):
            procs.agent(cfg, f"{mode}-d{i}", i)
    for mode, run_dir in runs.items():
        wait_for(f"{mode} summary", (run_dir / "summary.json").exists, 360, procs)
        assert aggregated_rounds(run_dir) == [1, 2], mode
    ffa = load_checkpoint(runs["ffa"], 2).state
    assert ffa and not any(".lora_A." in n for n in ffa) and any(".lora_B." in n for n in ffa)
    assert any(float(t.abs().sum()) > 0 for n, t in ffa.items() if ".lora_B." in n)  # B trained from zero
    given = {r["device_id"]: r["rank"] for r in records(runs["flexlora"], "assignment")}
    assert given == {"flexlora-d0": 1, "flexlora-d1": 4}
    ups = {(r["device_id"], r["round"]): (r["rank"], r["bytes_up"]) for r in records(runs["flexlora"], "device_round")
           if r["status"] == "accepted"}
    assert {k: v[0] for k, v in ups.items()} == {("flexlora-d0", 1): 1, ("flexlora-d1", 1): 4,
                                                ("flexlora-d0", 2): 1, ("flexlora-d1", 2): 4}
    assert ups[("flexlora-d0", 2)][1] < ups[("flexlora-d1", 2)][1]  # the rank-1 update is smaller on the wire
    flex = load_checkpoint(runs["flexlora"], 2).state
    assert all(torch.isfinite(t).all() for t in flex.values())
