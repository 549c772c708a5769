"""`simulate` and real MQTT processes run the same objects: same config and seed, same global tensors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from fl_processes import Procs, aggregated_rounds, records, run_dir_of, wait_for, write_config

from fedpeft_edge.config import load_config
from fedpeft_edge.server.checkpoint import load_checkpoint
from fedpeft_edge.simulation import Simulation

# ~20 s on the idle 2-core machine (three processes start torch; up to ~100 s when it is loaded).
pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def test_simulate_equals_mqtt_processes_bit_for_bit(mosquitto_broker: Any, tmp_path: Path) -> None:
    sections = {"data_args": {"partition_method": "dirichlet", "partition_alpha": 0.5}}
    (tmp_path / "sim").mkdir()
    mqtt_cfg = write_config(tmp_path / "mqtt.yaml", mosquitto_broker.port, "parity", **sections)
    sim_cfg = write_config(tmp_path / "sim" / "sim.yaml", mosquitto_broker.port, "parity", **sections)
    procs = Procs(tmp_path / "logs")
    try:
        procs.server(mqtt_cfg)
        for i in range(2):
            procs.agent(mqtt_cfg, f"dev{i}", i)
        mqtt_dir = run_dir_of(mqtt_cfg)
        wait_for("summary.json", (mqtt_dir / "summary.json").exists, 240, procs)
    finally:
        procs.stop_all()
    sim_dir = Simulation(load_config(sim_cfg)).run()
    assert aggregated_rounds(mqtt_dir) == aggregated_rounds(sim_dir) == [1, 2, 3]
    for rnd in (1, 2, 3):
        over_mqtt, simulated = load_checkpoint(mqtt_dir, rnd).state, load_checkpoint(sim_dir, rnd).state
        assert list(over_mqtt) == list(simulated)
        for name, tensor in over_mqtt.items():
            assert tensor.dtype == torch.float32
            assert torch.equal(tensor, simulated[name]), (rnd, name)  # bit-identical, not merely close
    first, last = load_checkpoint(sim_dir, 1).state, load_checkpoint(sim_dir, 3).state
    assert any(not torch.equal(first[k], last[k]) for k in first), "the rounds must have trained something"
    sim_rounds, mqtt_rounds = records(sim_dir, "round"), records(mqtt_dir, "round")
    assert all(r["bytes_kind"] == "encoded" and r["bytes_up"] > 0 for r in sim_rounds)
    assert all(r["bytes_kind"] == "wire" for r in mqtt_rounds)
    # the encoded frames are smaller than the MQTT packets that carried them (fixed + variable headers)
    assert sum(r["bytes_up"] for r in sim_rounds) < sum(r["bytes_up"] for r in mqtt_rounds)
    assert json.loads((sim_dir / "summary.json").read_text())["bytes_kind"] == "encoded"


def test_shared_model_delivery_trains_the_same_tensors_in_simulation(tmp_path: Path) -> None:
    """comm_args.model_delivery "shared" changes how the model travels, not what is trained."""
    dirs = {}
    for delivery in ("per_device", "shared"):
        (tmp_path / delivery).mkdir()
        cfg = write_config(tmp_path / delivery / "sim.yaml", 1883, f"deliver-{delivery}",
                           comm_args={"model_delivery": delivery})
        dirs[delivery] = Simulation(load_config(cfg)).run()
    assert aggregated_rounds(dirs["per_device"]) == aggregated_rounds(dirs["shared"]) == [1, 2, 3]
    for rnd in (1, 2, 3):
        a, b = load_checkpoint(dirs["per_device"], rnd).state, load_checkpoint(dirs["shared"], rnd).state
        assert all(torch.equal(a[k], b[k]) for k in a), rnd
    # Two devices: the shared run's server sent the model once a round instead of twice.
    per, shared = records(dirs["per_device"], "round"), records(dirs["shared"], "round")
    assert all(s["bytes_down"] < 0.75 * p["bytes_down"] for s, p in zip(shared, per, strict=True)), (per, shared)
