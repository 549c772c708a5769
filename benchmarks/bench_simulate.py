"""Simulation and fleet benchmark: `simulate` at the paper's scale, and the memory of a fleet of K devices.

1. `fedpeft-edge simulate`: 64 devices, 8 per round, 20 rounds, Dirichlet 0.1, bias-tuning the pretrained
   EfficientNet-Lite0 on digits (64 px, the paper's 10 local epochs). Wall time; overhead of the rounds over
   the sum of the devices' training time (server evaluation excluded, it is not protocol work); peak RSS.
2. One agent process (server + 1 agent over mosquitto, same per-device setting): its peak RSS.
3. A fleet host of K=100 devices (`fedpeft-agent --fleet 100`, over mosquitto, 3 rounds): its peak RSS against
   one agent's RSS + K x (PEFT tensors + optimizer state + data shard), each measured.

Peak RSS is the kernel's ru_maxrss of each process (os.wait4). Prints each figure beside its target.

    nice -n 10 python benchmarks/bench_simulate.py [--devices 64] [--per-round 8] [--rounds 20] [--fleet 100]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def _config(path: Path, run_id: str, devices: int, per_round: int, rounds: int, port: int = 1883,
            min_devices: int | None = None, eval_every: int = 5) -> Path:
    cfg = {
        "common_args": {"run_id": run_id, "random_seed": 0},
        "data_args": {"dataset": "digits", "partition_method": "dirichlet", "partition_alpha": 0.1,
                      "min_samples_per_client": 2, "test_fraction": 0.2, "image_size": 64, "batch_size": 32},
        "model_args": {"model": "tf_efficientnet_lite0", "num_classes": 10,
                       "weights": "efficientnet_lite0_package"},
        "peft_args": {"method": "bias"},
        "train_args": {"client_num_in_total": devices, "client_num_per_round": per_round, "comm_round": rounds,
                       "min_devices": min_devices or devices, "min_updates": per_round, "round_timeout_s": 900,
                       "epochs": 10, "learning_rate": 0.03, "momentum": 0.9, "nesterov": True,
                       "weight_decay": 1e-4, "eval_every": eval_every},
        "comm_args": {"broker_port": port},
        "device_args": {"num_threads": 1, "measure_latency": False},
        "tracking_args": {"run_dir": str(path.parent / "runs"), "log_level": "WARNING", "checkpoint_every": 1},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def _spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as fh:
        return subprocess.Popen([sys.executable, "-m", *args], cwd=REPO, env=ENV, stdout=fh,
                                stderr=subprocess.STDOUT)


def _wait(proc: subprocess.Popen[bytes], timeout_s: float) -> tuple[int, float]:
    """Exit code and peak RSS (MB) of a child, from the kernel's rusage."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return proc.returncode, usage.ru_maxrss / 1024
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"{proc.args!r} did not finish in {timeout_s:.0f} s")


def _records(run_dir: Path, kind: str) -> list[dict[str, Any]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("kind") == kind]


def bench_simulate(work: Path, devices: int, per_round: int, rounds: int) -> dict[str, Any]:
    cfg = _config(work / "sim.yaml", "bench-sim", devices, per_round, rounds)
    t0 = time.perf_counter()
    proc = _spawn(["fedpeft_edge.cli", "--log-level", "WARNING", "simulate", "--config", str(cfg)],
                  work / "simulate.log")
    code, rss = _wait(proc, 3600)
    wall = time.perf_counter() - t0
    if code != 0:
        raise SystemExit(f"simulate exited {code}; see {work / 'simulate.log'}")
    run_dir = work / "runs" / "bench-sim"
    rounds_ = [r for r in _records(run_dir, "round") if r["status"] == "aggregated"]
    devs = [r for r in _records(run_dir, "device_round") if r["status"] == "accepted"]
    train = sum(d["train_s"] for d in devs)
    eval_s = sum(((r.get("eval") or {}).get("eval_s") or 0.0) for r in rounds_)
    round_s = sum(r["round_s"] for r in rounds_)
    return {"wall_s": wall, "round_s": round_s, "eval_s": eval_s, "train_s": train, "rss_mb": rss,
            "overhead": (round_s - eval_s - train) / train, "updates": len(devs), "rounds": len(rounds_),
            "final_top1": json.loads((run_dir / "summary.json").read_text()).get("final_top1")}


def _mqtt_run(work: Path, name: str, cfg: Path, agent_args: list[str]) -> float:
    """Server + one agent program (a single device or a fleet) over mosquitto; the agent's peak RSS (MB)."""
    from fedpeft_edge.transport.broker import start_broker

    broker = start_broker()
    text = yaml.safe_load(cfg.read_text())
    text["comm_args"]["broker_port"] = broker.port
    cfg.write_text(yaml.safe_dump(text))
    server = _spawn(["server_app.main", "--config", str(cfg)], work / f"{name}-server.log")
    agent = _spawn(["device_agents.main", "--config", str(cfg), *agent_args], work / f"{name}.log")
    try:
        code, rss = _wait(agent, 1800)
        server.wait(timeout=120)
    finally:
        for p in (server, agent):
            if p.poll() is None:
                p.kill()
        broker.stop()
    if code != 0 or server.returncode != 0:
        raise SystemExit(f"{name}: agent exited {code}, server {server.returncode}; logs in {work}")
    return rss


def device_state_bytes(cfg_path: Path, k: int) -> dict[str, float]:
    """Each of k devices' own bytes, measured on real states (optimizer state after one real training)."""
    from fedpeft_edge.client.device import AgentIdentity, build_device_state
    from fedpeft_edge.client.runtime import SharedRuntime
    from fedpeft_edge.config import load_config

    runtime = SharedRuntime(load_config(cfg_path))
    states = [build_device_state(runtime, AgentIdentity(f"dev{i}", i)) for i in range(k)]
    with runtime.activate(states[0]) as slot:
        slot.trainer.train(max_steps=1)
    opt = states[0].nbytes()["optimizer"]  # the same tensors on every device (one momentum buffer per param)
    sizes = [s.nbytes() for s in states]
    return {"peft": sum(s["peft"] for s in sizes), "optimizer": opt * k, "data": sum(s["data"] for s in sizes),
            "shared": runtime.shared_bytes()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--devices", type=int, default=64)
    p.add_argument("--per-round", type=int, default=8)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--fleet", type=int, default=100)
    p.add_argument("--skip-fleet", action="store_true")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-simulate-"))

    sim = bench_simulate(work, args.devices, args.per_round, args.rounds)
    agent_cfg = _config(work / "agent.yaml", "bench-agent", args.devices, 1, 3, min_devices=1)
    agent_rss = _mqtt_run(work, "agent", agent_cfg, ["--device-id", "dev0", "--client-index", "0"])
    print(f"simulate: {args.devices} devices, {args.per_round}/round, {sim['rounds']} rounds, {sim['updates']} "
          f"updates, final top-1 {sim['final_top1']}")
    print(f"  wall time                       {sim['wall_s']:8.1f} s (rounds {sim['round_s']:.1f} s, server eval "
          f"{sim['eval_s']:.1f} s, device training {sim['train_s']:.1f} s)")
    print(f"  overhead over device training   {100 * sim['overhead']:8.2f} %      target <= 5 %   "
          f"{'MET' if sim['overhead'] <= 0.05 else 'MISSED'}")
    ratio = sim["rss_mb"] / agent_rss
    print(f"  peak RSS                        {sim['rss_mb']:8.1f} MB vs one agent process {agent_rss:.1f} MB: "
          f"{ratio:.2f}x   target <= 1.3x   {'MET' if ratio <= 1.3 else 'MISSED'}")
    if args.skip_fleet:
        return
    k = args.fleet
    fleet_cfg = _config(work / "fleet.yaml", "bench-fleet", k, args.per_round, 3)
    fleet_rss = _mqtt_run(work, "fleet", fleet_cfg, ["--fleet", str(k)])
    one_cfg = _config(work / "one.yaml", "bench-one", k, 1, 3, min_devices=1)
    one_rss = _mqtt_run(work, "one", one_cfg, ["--device-id", "dev0", "--client-index", "0"])
    own = device_state_bytes(fleet_cfg, k)
    per_device_mb = (own["peft"] + own["optimizer"] + own["data"]) / 2**20
    bound = 1.1 * (one_rss + per_device_mb)
    print(f"fleet of K={k} (one process, one backbone of {own['shared'] / 2**20:.1f} MB, {k} MQTT connections)")
    print(f"  K x own state (measured)        {per_device_mb:8.1f} MB (PEFT {own['peft'] / 2**20:.1f}, optimizer "
          f"{own['optimizer'] / 2**20:.1f}, data shards {own['data'] / 2**20:.1f})")
    print(f"  peak RSS                        {fleet_rss:8.1f} MB vs bound 1.1 x (agent {one_rss:.1f} + "
          f"{per_device_mb:.1f}) = {bound:.1f} MB   {'MET' if fleet_rss <= bound else 'MISSED'}")
    print(f"  per device beyond one agent     {(fleet_rss - one_rss) / k:8.2f} MB")
    print(f"logs and run directories in {work}")


if __name__ == "__main__":
    main()
