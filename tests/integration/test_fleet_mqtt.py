"""Two fleet hosts of 25 devices and two single agents through one mosquitto: the rounds' means are exact."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from fl_processes import Procs, aggregated_rounds, records, run_dir_of, wait_for, write_config
from test_rounds_mqtt import UpdateTap

from fedpeft_edge.peft.base import Manifest
from fedpeft_edge.server.checkpoint import load_checkpoint

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

FLEET = 25


@pytest.mark.parametrize("delivery", ["per_device", "shared"])
def test_fleets_and_single_agents_aggregate_the_weighted_mean(
    mosquitto_broker: Any, tmp_path: Path, delivery: str
) -> None:
    """Also with comm_args.model_delivery "shared": each round's model leaves the server once."""
    total = 2 * FLEET + 2
    cfg = write_config(
        tmp_path / "run.yaml", mosquitto_broker.port, "fleet", comm_args={"model_delivery": delivery},
        data_args={"partition_method": "dirichlet", "partition_alpha": 0.5, "max_train_samples": 1040,
                   "max_test_samples": 50},
        train_args={"client_num_in_total": total, "client_num_per_round": 20, "min_devices": total,
                    "min_updates": 10, "round_timeout_s": 60, "comm_round": 3, "max_steps": 2},
        device_args={"num_threads": 1, "measure_latency": False},
    )
    run_dir = run_dir_of(cfg)
    tap = UpdateTap(mosquitto_broker.port, "fleet")
    procs = Procs(tmp_path / "logs")
    try:
        procs.server(cfg)
        for host in range(2):
            procs.start(f"fleet{host}", "device_agents.main", "--config", str(cfg), "--fleet", str(FLEET),
                        "--client-index-start", str(host * FLEET), "--device-id-pattern", f"f{host}-{{index}}")
        procs.agent(cfg, "solo0", 2 * FLEET)
        procs.agent(cfg, "solo1", 2 * FLEET + 1)
        wait_for("summary.json", (run_dir / "summary.json").exists, 200, procs)
        codes = {name: p.wait(timeout=90) for name, p in procs.procs.items() if name != "server"}
    finally:
        tap.close()
        procs.stop_all()
    assert codes == {"fleet0": 0, "fleet1": 0, "solo0": 0, "solo1": 0}, procs.logs()
    assert aggregated_rounds(run_dir) == [1, 2, 3]
    joins = {r["device_id"]: r for r in records(run_dir, "join")}
    want = {f"f{h}-{i}" for h in range(2) for i in range(h * FLEET, (h + 1) * FLEET)} | {"solo0", "solo1"}
    assert set(joins) == want and all(j["accepted"] for j in joins.values())
    assert len({j["client_idx"] for j in joins.values()}) == total  # every device its own shard

    manifest = Manifest.from_json(load_checkpoint(run_dir, 1).manifest_json)
    ups = tap.updates(manifest)
    fleet_rows = 0
    for rnd in (1, 2, 3):
        rows = [r for r in records(run_dir, "device_round") if r["round"] == rnd and r["status"] == "accepted"]
        accepted = sorted(r["device_id"] for r in rows)
        assert len(accepted) >= 10
        total_n = sum(ups[(rnd, d)][0] for d in accepted)
        glob = load_checkpoint(run_dir, rnd).state
        for name in manifest.names:
            mean = sum(ups[(rnd, d)][1][name].double() * ups[(rnd, d)][0] / total_n for d in accepted)
            assert torch.allclose(glob[name].double(), mean, atol=1e-6), (rnd, name)
        for r in rows:
            dev: dict[str, Any] = (r.get("resources") or {}).get("device") or {}
            if r["device_id"].startswith("f"):
                fleet_rows += 1
                assert dev["train_thread_cpu_s"] > 0 and dev["state_bytes"]["total"] > 0
                assert dev["shared_backbone_bytes"] > dev["state_bytes"]["peft"]
    assert fleet_rows > 0
    # What the server metered sending: 20 copies of the model per round, or one copy and 20 small tasks (their
    # headers are about as large as this tiny model).
    model_bytes = sum(t.numel() * 4 for t in load_checkpoint(run_dir, 1).state.values())
    for r in records(run_dir, "round"):
        copies = r["bytes_down"] / model_bytes
        assert (copies >= 20) if delivery == "per_device" else (1 <= copies < 6), (delivery, r["bytes_down"])
    assert json.loads((run_dir / "summary.json").read_text())["rounds"] == 3
