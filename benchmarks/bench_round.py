"""Round benchmark: protocol overhead with 8 agent processes, agent throughput vs a bare loop, RSS growth, demo time.

Prints each figure beside its target. Everything runs for real: a broker, `fedpeft-server` and `fedpeft-agent`
processes on loopback. Figures on a shared 2-core machine are noisy: medians, and ratios measured side by side.

    python benchmarks/bench_round.py [--agents 8] [--rounds 20] [--skip-demo]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from run_configs import tiny_vit_run  # noqa: E402 (benchmarks/ is on sys.path as the script's folder)


def federated_run(agents: int, rounds: int) -> dict[str, Any]:
    """Run a real job and read per-round overhead and per-device RSS from its metrics.jsonl."""
    from fedpeft_edge.transport.broker import start_broker

    work = Path(tempfile.mkdtemp(prefix="bench-round-"))
    broker = start_broker()
    cfg = tiny_vit_run(work / "run.yaml", "bench-round", broker.port, agents, rounds)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    logs = [(work / f"{n}.log").open("wb") for n in ["server", *[f"dev{i}" for i in range(agents)]]]
    procs = [subprocess.Popen([sys.executable, "-m", "server_app.main", "--config", str(cfg)], cwd=REPO, env=env,
                              stdout=logs[0], stderr=subprocess.STDOUT)]
    for i in range(agents):
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "device_agents.main", "--config", str(cfg), "--device-id", f"dev{i}",
             "--client-index", str(i)], cwd=REPO, env=env, stdout=logs[i + 1], stderr=subprocess.STDOUT))
    try:
        code = procs[0].wait(timeout=1800)
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            p.wait(timeout=30)
        broker.stop()
    if code != 0:
        raise SystemExit(f"server exited {code}; logs in {work}")
    recs = [json.loads(line) for line in (work / "runs" / "bench-round" / "metrics.jsonl").read_text().splitlines()]
    rounds_ = [r for r in recs if r["kind"] == "round"]
    devs = [r for r in recs if r["kind"] == "device_round" and r["status"] == "accepted"]
    overhead, eval_s = [], []
    for r in rounds_:
        train = [d["train_s"] for d in devs if d["round"] == r["round"]]
        overhead.append(r["round_s"] - max(train))
        eval_s.append((r.get("eval") or {}).get("eval_s") or 0.0)
    rss: dict[str, dict[int, float]] = {}
    for d in devs:
        rss.setdefault(d["device_id"], {})[d["round"]] = d["resources"]["rss_peak_mb"]
    growth = [(v[rounds] - v[1]) / v[1] for v in rss.values() if 1 in v and rounds in v]
    return {"overhead_s": overhead, "eval_s": eval_s, "rss_growth": growth,
            "rss_round1_mb": [v[1] for v in rss.values()],
            "agent_ips": [d["images_per_s"] for d in devs if d.get("images_per_s")], "work": work}


def throughput_ratio(repeats: int = 5) -> tuple[float, float, float]:
    """LocalTrainer vs a bare PyTorch loop over the same model and loader, alternating; medians."""
    from fedpeft_edge.backbone import build_backbone
    from fedpeft_edge.config import DataArgs, ModelArgs, PeftArgs, TrainArgs
    from fedpeft_edge.data import build_client_data
    from fedpeft_edge.peft import build_method
    from fedpeft_edge.training import LocalTrainer, set_batchnorm_eval

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model_args = ModelArgs(model="tf_efficientnet_lite0", num_classes=10, weights="efficientnet_lite0_package")
    backbone = build_backbone(model_args)
    method = build_method(PeftArgs(method="bias"))
    model = method.apply(backbone.model)
    data_args = DataArgs(dataset="digits", image_size=64, batch_size=32, max_train_samples=1000)
    data = build_client_data(data_args, backbone.data_config, 2, 0, 0)
    train_args = TrainArgs(learning_rate=0.03)
    trainer = LocalTrainer(model, train_args, "cpu", data.train_loader)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.03, momentum=0.9, nesterov=True, weight_decay=1e-4)
    loss_fn = torch.nn.CrossEntropyLoss()

    def bare() -> float:
        model.train()
        set_batchnorm_eval(model)
        n, t0 = 0, time.perf_counter()
        for x, y in data.train_loader:
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            opt.step()
            n += len(y)
        return n / (time.perf_counter() - t0)

    def ours() -> float:
        res = trainer.train(epochs=1)
        return res.samples / res.wall_s

    ours()
    bare()  # warm-up
    a, b = [], []
    for _ in range(repeats):
        a.append(ours())
        b.append(bare())
    return statistics.median(a), statistics.median(b), statistics.median(x / y for x, y in zip(a, b, strict=True))


def demo_wall_time() -> float:
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "fedpeft_edge.cli", "demo", "--no-report", "--run-dir", tmp],
                       cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--agents", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--skip-demo", action="store_true")
    args = ap.parse_args()
    print(f"federated run: {args.agents} agent processes, {args.rounds} rounds, tiny ViT, bias, loopback mosquitto")
    run = federated_run(args.agents, args.rounds)
    med = statistics.median(run["overhead_s"])
    print(f"  per-round protocol overhead (round time - slowest device's training), median: {med:.3f} s "
          f"(min {min(run['overhead_s']):.3f}, max {max(run['overhead_s']):.3f}); target <= 0.25 s -> "
          f"{'met' if med <= 0.25 else 'MISSED'}")
    net = statistics.median(o - e for o, e in zip(run["overhead_s"], run["eval_s"], strict=True))
    print(f"  of which server-side evaluation of the global model: median {statistics.median(run['eval_s']):.3f} s;"
          f" overhead without it: {net:.3f} s")
    g = max(run["rss_growth"]) if run["rss_growth"] else float("nan")
    print(f"  agent RSS round 1: median {statistics.median(run['rss_round1_mb']):.0f} MB; growth to round "
          f"{args.rounds}: max {100 * g:+.2f}% over {len(run['rss_growth'])} agents; target <= 5% -> "
          f"{'met' if g <= 0.05 else 'MISSED'}")
    ours, bare, ratio = throughput_ratio()
    print(f"local training (tf_efficientnet_lite0, bias, digits 64 px, batch 32, 1 thread): LocalTrainer "
          f"{ours:.1f} img/s vs bare PyTorch loop {bare:.1f} img/s, ratio {ratio:.3f}; target >= 0.97 -> "
          f"{'met' if ratio >= 0.97 else 'MISSED'}")
    if not args.skip_demo:
        wall = demo_wall_time()
        print(f"default demo wall time: {wall:.1f} s; target < 180 s -> {'met' if wall < 180 else 'MISSED'}")


if __name__ == "__main__":
    main()
