"""FedPEFT rounds over a real mosquitto with real server and agent processes (issue: rounds + demo)."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import torch
from fl_processes import (
    Procs,
    aggregated_rounds,
    records,
    restart_mosquitto,
    run_dir_of,
    wait_for,
    write_config,
)
from paho.mqtt.enums import CallbackAPIVersion

from fedpeft_edge.peft.base import Manifest
from fedpeft_edge.server.checkpoint import latest_round, load_checkpoint
from fedpeft_edge.wire.chunk import is_chunk
from fedpeft_edge.wire.codec import decode_message, decode_tensors

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


class UpdateTap:
    """A passive MQTT subscriber that keeps every device->server message of a run (raw payloads)."""

    def __init__(self, port: int, run_id: str) -> None:
        self.payloads: list[bytes] = []
        self._lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"tap-{run_id}")
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(f"fedpeft/{run_id}/d2s/+", qos=1)
        self.client.loop_start()

    def _on_message(self, _c: Any, _u: Any, msg: Any) -> None:
        with self._lock:
            self.payloads.append(bytes(msg.payload))

    def updates(self, manifest: Manifest) -> dict[tuple[int, str], tuple[int, dict[str, torch.Tensor]]]:
        out = {}
        for payload in self.payloads:
            assert not is_chunk(payload), "tiny updates must fit one packet"
            params, blob = decode_message(payload)
            if params.get("msg_type") != 3 or blob is None:
                continue
            tensors = decode_tensors(blob, manifest, manifest.hash, copy=True)
            out[(params["round_idx"], str(params["sender"]))] = (params["num_samples"], tensors)
        return out

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def test_three_rounds_aggregate_the_sample_weighted_mean(mosquitto_broker: Any, tmp_path: Path, procs: Procs) -> None:
    cfg = write_config(tmp_path / "run.yaml", mosquitto_broker.port, "weighted",
                       data_args={"partition_method": "dirichlet", "partition_alpha": 0.5})
    run_dir = run_dir_of(cfg)
    tap = UpdateTap(mosquitto_broker.port, "weighted")
    procs.server(cfg)
    for i in range(2):
        procs.agent(cfg, f"dev{i}", i)
    wait_for("summary.json", (run_dir / "summary.json").exists, 240, procs)
    tap.close()
    assert aggregated_rounds(run_dir) == [1, 2, 3]
    manifest = Manifest.from_json(load_checkpoint(run_dir, 1).manifest_json)
    ups = tap.updates(manifest)
    samples = {r["device_id"]: r["num_samples"] for r in records(run_dir, "join")}
    assert samples["dev0"] != samples["dev1"], "Dirichlet shards should differ in size"
    for rnd in (1, 2, 3):
        accepted = [r["device_id"] for r in records(run_dir, "device_round")
                    if r["round"] == rnd and r["status"] == "accepted"]
        assert sorted(accepted) == ["dev0", "dev1"]
        total = sum(ups[(rnd, d)][0] for d in accepted)
        glob = load_checkpoint(run_dir, rnd).state
        for name in manifest.names:
            want = sum(ups[(rnd, d)][1][name].double() * ups[(rnd, d)][0] / total for d in accepted)
            assert torch.allclose(glob[name].double(), want, atol=1e-6), (rnd, name)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds"] == 3 and summary["bytes_total"] > 0
    rounds = records(run_dir, "round")
    assert all(r["bytes_up"] > 0 and r["bytes_down"] > 0 for r in rounds)
    assert all(p.wait(timeout=30) == 0 for name, p in procs.procs.items() if name.startswith("dev"))


def test_agent_killed_mid_round_the_run_completes(mosquitto_broker: Any, tmp_path: Path, procs: Procs) -> None:
    cfg = write_config(tmp_path / "run.yaml", mosquitto_broker.port, "killed",
                       train_args={"client_num_in_total": 3, "client_num_per_round": 3, "min_devices": 3,
                                   "min_updates": 2, "round_timeout_s": 30, "comm_round": 4, "max_steps": 60})
    run_dir = run_dir_of(cfg)
    procs.server(cfg)
    for i in range(3):
        procs.agent(cfg, f"dev{i}", i)
    wait_for("round 1", lambda: 1 in aggregated_rounds(run_dir), 180, procs)
    procs.kill("dev2", signal.SIGKILL)  # rounds take seconds (60 steps): this lands while round 2 trains
    done_at_kill = max(aggregated_rounds(run_dir))
    wait_for("summary.json", (run_dir / "summary.json").exists, 240, procs)
    assert aggregated_rounds(run_dir) == [1, 2, 3, 4]
    dev2 = {r["round"]: r["status"] for r in records(run_dir, "device_round") if r["device_id"] == "dev2"}
    after = [rnd for rnd in dev2 if rnd > done_at_kill + 1]  # the round in flight may still have its update
    assert all(dev2[rnd] == "dropped" for rnd in after), dev2
    assert "dropped" in dev2.values(), dev2
    for r in records(run_dir, "round"):
        if r["round"] > done_at_kill + 1:
            assert r["accepted"] == 2, r  # the others' updates, aggregated without the dead device


def test_server_killed_after_round_two_resumes(mosquitto_broker: Any, tmp_path: Path, procs: Procs) -> None:
    cfg = write_config(tmp_path / "run.yaml", mosquitto_broker.port, "resumed",
                       train_args={"comm_round": 5, "epochs": 3})
    run_dir = run_dir_of(cfg)
    procs.server(cfg)
    for i in range(2):
        procs.agent(cfg, f"dev{i}", i)
    wait_for("round 2 checkpoint", lambda: (run_dir / "checkpoints" / "round_0002.safetensors").exists(), 180,
             procs)
    procs.kill("server", signal.SIGKILL)
    done = latest_round(run_dir)  # 2, or 3 if round 3 closed before the kill landed
    assert done is not None and done >= 2
    before = [r for r in records(run_dir, "round") if r["round"] <= done]
    procs.start("server2", "server_app.main", "--resume", str(run_dir))
    wait_for("summary.json", (run_dir / "summary.json").exists, 240, procs)
    rounds = aggregated_rounds(run_dir)
    assert rounds == [1, 2, 3, 4, 5], rounds  # every round once: none lost, none repeated
    assert records(run_dir, "round")[:done] == before
    assert records(run_dir, "resume")[0]["next_round"] == done + 1
    assert json.loads((run_dir / "summary.json").read_text())["rounds"] == 5


def test_device_with_a_different_backbone_is_refused(mosquitto_broker: Any, tmp_path: Path, procs: Procs) -> None:
    cfg = write_config(tmp_path / "run.yaml", mosquitto_broker.port, "refuse", train_args={"comm_round": 1})
    other = write_config(tmp_path / "other.yaml", mosquitto_broker.port, "refuse", train_args={"comm_round": 1},
                         model_args={"model_kwargs": {"img_size": 32, "patch_size": 8, "embed_dim": 32,
                                                      "depth": 3, "num_heads": 2}})
    run_dir = run_dir_of(cfg)
    procs.server(cfg)
    stranger = procs.agent(other, "stranger", 0)
    assert stranger.wait(timeout=120) == 3
    joins = records(run_dir, "join")
    assert joins and not joins[0]["accepted"]
    assert joins[0]["reason"].startswith("backbone differs")  # named by what differs (a deeper ViT)
    assert "refused by the server" in procs.log("stranger")
    for i in range(2):
        procs.agent(cfg, f"dev{i}", i)
    wait_for("summary.json", (run_dir / "summary.json").exists, 180, procs)
    assert aggregated_rounds(run_dir) == [1]


def test_broker_restart_mid_run(mosquitto_factory: Any, tmp_path: Path, procs: Procs) -> None:
    broker = mosquitto_factory()
    cfg = write_config(tmp_path / "run.yaml", broker.port, "restart",
                       train_args={"comm_round": 4, "round_timeout_s": 40, "max_steps": 60})
    run_dir = run_dir_of(cfg)
    procs.server(cfg)
    for i in range(2):
        procs.agent(cfg, f"dev{i}", i)
    wait_for("round 1", lambda: 1 in aggregated_rounds(run_dir), 180, procs)
    broker.stop()
    assert max(aggregated_rounds(run_dir)) < 4, "the run must still be going when the broker goes down"
    time.sleep(2.0)
    again = restart_mosquitto(broker.config_path, broker.port, broker.log_path)
    try:
        wait_for("summary.json", (run_dir / "summary.json").exists, 240, procs)
    finally:
        again.terminate()
        again.wait(timeout=10)
    assert aggregated_rounds(run_dir) == [1, 2, 3, 4]
    assert "reconnected" in procs.log("dev0") and "reconnected" in procs.log("server")


def test_devices_evaluate_through_onnxruntime(mosquitto_broker: Any, tmp_path: Path, procs: Procs) -> None:
    cfg = write_config(tmp_path / "run.yaml", mosquitto_broker.port, "ort",
                       train_args={"comm_round": 2, "evaluate_on_devices": True},
                       device_args={"num_threads": 1, "latency_runs": 5})
    run_dir = run_dir_of(cfg)
    procs.server(cfg)
    procs.agent(cfg, "dev0", 0, "--eval-backend", "onnxruntime")
    procs.agent(cfg, "dev1", 1)
    wait_for("summary.json", (run_dir / "summary.json").exists, 240, procs)
    rows = {(r["round"], r["device_id"]): r for r in records(run_dir, "device_round")}
    ort_eval, torch_eval = rows[(2, "dev0")]["global_eval"], rows[(2, "dev1")]["global_eval"]
    assert ort_eval["backend"] == "onnxruntime" and torch_eval["backend"] == "torch"
    assert 0.0 <= ort_eval["top1"] <= 1.0 and ort_eval["samples"] > 0
    profiles = {r["device_id"]: r["profile"] for r in records(run_dir, "join")}
    latency = profiles["dev0"]["inference_latency_ms"]
    assert latency["median_ms"] > 0 and latency["runs"] == 5
    assert profiles["dev0"]["eval_backend"] == "onnxruntime"
