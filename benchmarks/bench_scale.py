"""Many devices per round through ONE mosquitto: round overhead, server CPU per update, server RSS, fleet memory.

1. Rounds of 100, 300 and 1000 devices (every device every round), hosted by 4 fleet hosts
   (`fedpeft-agent --fleet K`: 4 x 25 / 75 / 250), the real `fedpeft-server` process, one mosquitto on loopback.
   A small model so training is short (a tiny random-init ViT, 1 local step of 16 Fashion-MNIST images at 32 px),
   but an update of a real size: head tuning with 846 classes, whose 55k fp32 head tensors encode to about
   220 KB, EfficientNet-Lite0's bias update. The update size printed is the METERED one (the device_round
   records' bytes_up: whole MQTT PUBLISH packets as the server's socket received them).
   - Round overhead = the round's time (its `round` record's round_s, round open to aggregation) minus the
     training critical path. Devices of one fleet host train one at a time, so the critical path is the
     largest, over the hosts, sum of that host's accepted devices' training windows (`train_s` of their
     reports: the local training loop only; decoding the global tensors, loading them and encoding the update
     on the device count as overhead, so the figure is an upper bound of protocol cost).
   - Server CPU per accepted update = user+system CPU of the server process (psutil) from one round's close
     (round 1: its round_open record) to the next round's close, divided by that round's accepted updates:
     it includes sending the global model to every device, receiving, decoding and aggregating the updates,
     the records and the checkpoint.
   - Server peak RSS = the kernel's ru_maxrss of the server process (os.wait4).
   - Each size runs once per `--model-delivery` (default: per_device, then shared), with the bytes the
     server metered sending per round.
2. Fleet memory: a fleet of K=100 on the pretrained EfficientNet-Lite0 with bias (the setting of
   bench_simulate.py; Dirichlet 0.1, so shards hold 2 (the minimum) to 56 training samples), with the code of `--before`
   (default: the main checkout) and of this tree, in the same run, against the bound 1.1 x (one agent's RSS +
   K x (PEFT tensors + optimizer state + data shard), each measured). Two single agents give "one agent's
   RSS": dev0 (9 samples, as bench_simulate.py measured it), and the device with the largest shard: a
   training window's activations grow with its batch (up to batch_size 32), and the fleet's peak is the
   window of the largest-batch device it trains, so that agent is the like-for-like reference.

    python benchmarks/bench_scale.py [--sizes 100 300 1000] [--rounds 3] [--hosts 4] [--skip-fleet-memory]
        [--model-delivery per_device shared]
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

import psutil
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

TINY_VIT = {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2}
HEAD_CLASSES = 846  # (64 + 1) x 846 fp32 = 220 KB: EfficientNet-Lite0's bias update
OVERHEAD_TARGET_S = 5.0  # at 1000 devices per round
CPU_TARGET_MS = 2.0  # per accepted update


def _env(pythonpath: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(pythonpath)}


def _config(path: Path, port: int, devices: int, rounds: int, delivery: str = "per_device") -> Path:
    cfg = {
        "common_args": {"run_id": f"scale-{devices}", "random_seed": 0},
        "data_args": {"dataset": "fashion_mnist", "partition_method": "iid", "image_size": 32, "batch_size": 16,
                      "max_train_samples": 12 * devices, "max_test_samples": 64, "min_samples_per_client": 5},
        "model_args": {"model": "vit_tiny_patch16_224", "num_classes": HEAD_CLASSES, "weights": "none",
                       "model_kwargs": TINY_VIT},
        "peft_args": {"method": "head"},
        "train_args": {"client_num_in_total": devices, "client_num_per_round": devices, "comm_round": rounds,
                       "min_devices": devices, "min_updates": devices, "round_timeout_s": 600,
                       "join_timeout_s": 900, "max_steps": 1, "learning_rate": 0.05, "eval_every": rounds + 1},
        "comm_args": {"broker_port": port, "keepalive_s": 60, "model_delivery": delivery},
        "device_args": {"num_threads": 1, "measure_latency": False},
        "tracking_args": {"run_dir": str(path.parent / "runs"), "log_level": "WARNING"},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


# The server under cProfile with a CPU-time clock of its receive thread (paho's network thread is not in it).
_PROFILED = ("import cProfile, runpy, sys, time; sys.argv = ['server_app.main', *sys.argv[1:]]; "
             "p = cProfile.Profile(time.thread_time)\n"
             "try:\n    p.runcall(runpy.run_module, 'server_app.main', run_name='__main__')\n"
             "except SystemExit:\n    pass\np.dump_stats({out!r})")


def _spawn(args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with log.open("wb") as fh:
        return subprocess.Popen([sys.executable, *args], cwd=REPO, env=env, stdout=fh,
                                stderr=subprocess.STDOUT)


def _reap(proc: subprocess.Popen[bytes]) -> tuple[int, float] | None:
    """(exit code, peak RSS MB from the kernel's rusage) once the child ended, else None."""
    pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
    if not pid:
        return None
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss / 1024


class _Tail:
    """New records of a metrics.jsonl as the server writes them."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset, self.rest = path, 0, b""

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        with self.path.open("rb") as fh:
            fh.seek(self.offset)
            data = fh.read()
        self.offset += len(data)
        *lines, self.rest = (self.rest + data).split(b"\n")
        return [json.loads(line) for line in lines if line.strip()]


def scale_run(work: Path, devices: int, rounds: int, hosts: int, profile: bool = False,
              delivery: str = "per_device") -> dict[str, Any]:
    """One run of `devices` per round on `hosts` fleet hosts; per-round figures from records and psutil."""
    from fedpeft_edge.transport.broker import start_broker

    run_work = work / f"n{devices}-{delivery}"
    run_work.mkdir()
    broker = start_broker()
    cfg = _config(run_work / "run.yaml", broker.port, devices, rounds, delivery)
    env = _env(REPO)
    prog = (["-c", _PROFILED.format(out=str(run_work / "server.prof")), "--config", str(cfg)] if profile
            else ["-m", "server_app.main", "--config", str(cfg)])
    server = _spawn(prog, run_work / "server.log", env)
    sizes = [devices // hosts + (1 if h < devices % hosts else 0) for h in range(hosts)]
    starts = [sum(sizes[:h]) for h in range(hosts)]
    fleets = [_spawn(["-m", "device_agents.main", "--config", str(cfg), "--fleet", str(k), "--client-index-start",
                      str(s), "--device-id-pattern", f"h{h}-{{index}}"], run_work / f"host{h}.log", env)
              for h, (k, s) in enumerate(zip(sizes, starts, strict=True))]
    ps = psutil.Process(server.pid)
    others = [psutil.Process(f.pid) for f in fleets] + [c for c in psutil.Process().children(recursive=True)
                                                        if c.name() == "mosquitto"]
    tail = _Tail(run_work / "runs" / f"scale-{devices}" / "metrics.jsonl")
    recs: list[dict[str, Any]] = []
    cpu_marks: dict[int, float] = {}  # round -> server CPU s at its close (0: at round 1's open)
    thread_marks: dict[int, dict[int, float]] = {}  # round -> server thread id -> CPU s
    other_marks: dict[int, list[float]] = {}  # round -> CPU s of each fleet host, then mosquitto
    t0 = time.monotonic()
    done: tuple[int, float] | None = None
    try:
        while done is None:
            if time.monotonic() - t0 > 1800:
                raise SystemExit(f"{devices} devices: no end after 1800 s; logs in {run_work}")
            cpu = ps.cpu_times()
            for r in tail.read():
                recs.append(r)
                if r["kind"] == "round_open" and r["round"] == 1 and 0 not in cpu_marks:
                    cpu_marks[0] = cpu.user + cpu.system
                    thread_marks[0] = {t.id: t.user_time + t.system_time for t in ps.threads()}
                    other_marks[0] = _cpu_of(others)
                elif r["kind"] == "round" and r["status"] == "aggregated":
                    cpu_marks[r["round"]] = cpu.user + cpu.system
                    thread_marks[r["round"]] = {t.id: t.user_time + t.system_time for t in ps.threads()}
                    other_marks[r["round"]] = _cpu_of(others)
            done = _reap(server)
            time.sleep(0.02)
        for f in fleets:
            f.wait(timeout=120)
    finally:
        for p in (server, *fleets):
            if p.poll() is None:
                p.kill()
                p.wait()
        broker.stop()
    code, server_rss = done
    if code != 0 or any(f.returncode for f in fleets):
        raise SystemExit(f"{devices} devices: server exited {code}, hosts {[f.returncode for f in fleets]}; "
                         f"logs in {run_work}")
    recs += tail.read()
    out = _figures(recs, cpu_marks, hosts, server_rss)
    last = max(thread_marks)
    first = thread_marks[0]
    spent = [b - a for a, b in zip(other_marks[0], other_marks[last], strict=True)]
    updates = sum(r["accepted"] for r in out["rounds"])
    train_cpu = sum(((d.get("resources") or {}).get("device") or {}).get("train_thread_cpu_s") or 0.0
                    for d in recs if d["kind"] == "device_round" and d["status"] == "accepted")
    out["host_ms_per_device"] = 1e3 * sum(spent[:hosts]) / max(updates, 1)
    out["train_ms_per_device"] = 1e3 * train_cpu / max(updates, 1)
    out["broker_ms_per_update"] = 1e3 * sum(spent[hosts:]) / max(updates, 1)
    out["thread_cpu_s"] = sorted((round(c - first.get(t, 0.0), 2) for t, c in thread_marks[last].items()), reverse=True)
    return out


def _cpu_of(procs: list[psutil.Process]) -> list[float]:
    return [sum(p.cpu_times()[:2]) for p in procs]


def _figures(recs: list[dict[str, Any]], cpu_marks: dict[int, float], hosts: int, server_rss: float
             ) -> dict[str, Any]:
    rounds = [r for r in recs if r["kind"] == "round" and r["status"] == "aggregated"]
    devs = [r for r in recs if r["kind"] == "device_round" and r["status"] == "accepted"]
    out: list[dict[str, Any]] = []
    for r in rounds:
        mine = [d for d in devs if d["round"] == r["round"]]
        per_host = [sum(d["train_s"] for d in mine if d["device_id"].startswith(f"h{h}-")) for h in range(hosts)]
        crit = max(per_host)
        prev = cpu_marks.get(r["round"] - 1)
        cpu = cpu_marks[r["round"]] - prev if prev is not None and r["round"] in cpu_marks else float("nan")
        out.append({"round": r["round"], "accepted": r["accepted"], "round_s": r["round_s"], "critical_s": crit,
                    "overhead_s": r["round_s"] - crit, "cpu_ms_per_update": 1e3 * cpu / max(r["accepted"], 1),
                    "aggregate_s": r["aggregate_s"], "bytes_down": r["bytes_down"]})
    return {"rounds": out, "bytes_up": statistics.median(d["bytes_up"] for d in devs),
            "dropped": sum(1 for r in recs if r["kind"] == "dropped_message"), "server_rss_mb": server_rss}


def fleet_memory(work: Path, k: int, before: Path | None) -> dict[str, Any]:
    """Peak RSS of one agent and of a fleet of K (code of `before`, when given, and of this tree), and the
    bound."""
    from bench_simulate import _config as sim_config
    from bench_simulate import device_state_bytes

    from fedpeft_edge.transport.broker import start_broker

    def run(name: str, cfg: Path, agent_args: list[str], code_root: Path) -> float:
        broker = start_broker()
        text = yaml.safe_load(cfg.read_text())
        text["comm_args"]["broker_port"] = broker.port
        cfg.write_text(yaml.safe_dump(text))
        env = _env(code_root)
        server = _spawn(["-m", "server_app.main", "--config", str(cfg)], work / f"{name}-server.log", env)
        agent = _spawn(["-m", "device_agents.main", "--config", str(cfg), *agent_args], work / f"{name}.log", env)
        try:
            deadline = time.monotonic() + 1800
            while (got := _reap(agent)) is None:
                if time.monotonic() > deadline:
                    raise SystemExit(f"{name}: the agent did not finish in 1800 s; logs in {work}")
                time.sleep(0.2)
            server.wait(timeout=120)
        finally:
            for p in (server, agent):
                if p.poll() is None:
                    p.kill()
                    p.wait()
            broker.stop()
        if got[0] != 0 or server.returncode != 0:
            raise SystemExit(f"{name}: agent exited {got[0]}, server {server.returncode}; logs in {work}")
        return got[1]

    one_cfg = sim_config(work / "one.yaml", "mem-one", k, 1, 3, min_devices=1)
    one = run("one", one_cfg, ["--device-id", "dev0", "--client-index", "0"], REPO)
    big, big_n = _largest_shard(one_cfg, k)
    big_cfg = sim_config(work / "big.yaml", "mem-big", k, 1, 3, min_devices=1)
    one_big = run("one-big", big_cfg, ["--device-id", f"dev{big}", "--client-index", str(big)], REPO)
    fleet_args = ["--fleet", str(k)]
    before_rss = (run("fleet-before", sim_config(work / "fleet-b.yaml", "mem-fleet-b", k, 8, 3), fleet_args, before)
                  if before is not None else None)
    after_rss = run("fleet-after", sim_config(work / "fleet-a.yaml", "mem-fleet-a", k, 8, 3), fleet_args, REPO)
    own = device_state_bytes(work / "fleet-a.yaml", k)
    own_mb = (own["peft"] + own["optimizer"] + own["data"]) / 2**20
    return {"one": one, "one_big": one_big, "big": big, "big_n": big_n, "before": before_rss, "after": after_rss,
            "own_mb": own_mb, "own": own, "bound": 1.1 * (one + own_mb), "bound_big": 1.1 * (one_big + own_mb)}


def _largest_shard(cfg_path: Path, k: int) -> tuple[int, int]:
    """The shard with the most training samples (its batches, and so its activations, are the largest)."""
    from fedpeft_edge.config import load_config
    from fedpeft_edge.data import load_source
    from fedpeft_edge.data.loader import split_train_test
    from fedpeft_edge.data.partition import partition_pool

    cfg = load_config(cfg_path)
    src = load_source(cfg.data_args)
    parts = partition_pool(src.train.labels, cfg.data_args, k, cfg.common_args.random_seed, src.num_classes)
    sizes = [len(split_train_test(p, cfg.data_args.test_fraction, cfg.common_args.random_seed, i)[0])
             for i, p in enumerate(parts)]
    best = max(range(k), key=sizes.__getitem__)
    return best, sizes[best]


def _verdict(ok: bool) -> str:
    return "MET" if ok else "MISSED"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--sizes", type=int, nargs="*", default=[100, 300, 1000])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--hosts", type=int, default=4)
    p.add_argument("--fleet", type=int, default=100, help="K of the fleet memory bound")
    p.add_argument("--before", type=Path, default=None, metavar="CHECKOUT",
                   help="another checkout of the project (e.g. a worktree of the previous commit) to measure the "
                   "fleet's memory 'before' with; without it only this tree is measured")
    p.add_argument("--skip-fleet-memory", action="store_true")
    p.add_argument("--profile-server", action="store_true", help="run the server under cProfile (server.prof)")
    p.add_argument("--model-delivery", nargs="*", choices=["per_device", "shared"], default=["per_device", "shared"],
                   help="comm_args.model_delivery of the runs; several: one run each, alternating, per size")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    print(f"{args.hosts} fleet hosts, one mosquitto, real server; tiny ViT, head tuning ({HEAD_CLASSES} classes), "
          f"1 local step; every device every round, {args.rounds} rounds; medians over rounds")
    results: dict[tuple[int, str], dict[str, Any]] = {}
    for n in args.sizes:
        for delivery in args.model_delivery:
            _report(n, delivery, results.setdefault((n, delivery), scale_run(
                work, n, args.rounds, args.hosts, args.profile_server, delivery)))
    for delivery in args.model_delivery:
        mine = {n: res for (n, d), res in results.items() if d == delivery}
        if len(mine) > 1:
            base = min(mine)
            b = statistics.median(r["overhead_s"] for r in mine[base]["rounds"])
            print(f"  {delivery}: overhead growth vs {base} devices: " + ", ".join(
                f"{n}: {statistics.median(r['overhead_s'] for r in res['rounds']) / b:.2f}x ({n / base:.0f}x devices)"
                for n, res in mine.items() if n != base))
    _fleet_memory_report(work, args)


def _fleet_memory_report(work: Path, args: argparse.Namespace) -> None:
    if not args.skip_fleet_memory:
        m = fleet_memory(work, args.fleet, args.before)
        print(f"fleet memory, K={args.fleet} on EfficientNet-Lite0 + bias over mosquitto (bench_simulate's setting)")
        print(f"  one agent peak RSS {m['one']:.1f} MB; K x own state {m['own_mb']:.1f} MB (PEFT "
              f"{m['own']['peft'] / 2**20:.1f}, optimizer {m['own']['optimizer'] / 2**20:.1f}, data "
              f"{m['own']['data'] / 2**20:.1f}); bound 1.1 x (agent + K x own) = {m['bound']:.1f} MB")
        print(f"  one agent on the largest shard (dev{m['big']}, {m['big_n']} training samples: the fleet's largest "
              f"batches) {m['one_big']:.1f} MB; bound with it {m['bound_big']:.1f} MB")
        for name in ("before", "after"):
            if m[name] is None:
                print(f"  fleet peak RSS, {name:6s}: not measured (pass --before CHECKOUT)")
                continue
            print(f"  fleet peak RSS, {name:6s}: {m[name]:8.1f} MB ({(m[name] - m['one']) / args.fleet:.2f} MB a "
                  f"device beyond dev0's agent): vs dev0 bound {_verdict(m[name] <= m['bound'])}, vs "
                  f"largest-shard bound {_verdict(m[name] <= m['bound_big'])}")
    print(f"logs and run directories in {work}")


def _report(n: int, delivery: str, res: dict[str, Any]) -> None:
    rs = res["rounds"]
    over = statistics.median(r["overhead_s"] for r in rs)
    cpu = statistics.median(r["cpu_ms_per_update"] for r in rs)
    print(f"  {n:5d} devices/round, model_delivery {delivery}: update {res['bytes_up'] / 1e3:.1f} KB "
          f"metered; accepted {[r['accepted'] for r in rs]}; dropped messages {res['dropped']}; the server sent "
          f"{statistics.median(r['bytes_down'] for r in rs) / 1e6:.1f} MB a round (metered)")
    print(f"        round {statistics.median(r['round_s'] for r in rs):7.2f} s, training critical path "
          f"{statistics.median(r['critical_s'] for r in rs):6.2f} s, overhead {over:6.2f} s "
          f"(per round {[round(r['overhead_s'], 2) for r in rs]})"
          + (f"   target <= {OVERHEAD_TARGET_S:g} s: {_verdict(over <= OVERHEAD_TARGET_S)}" if n == 1000 else ""))
    print(f"        server CPU {cpu:6.3f} ms per accepted update (per round "
          f"{[round(r['cpu_ms_per_update'], 3) for r in rs]}), aggregate_s "
          f"{statistics.median(r['aggregate_s'] for r in rs):.3f}; server peak RSS {res['server_rss_mb']:.0f} MB"
          + (f"   target <= {CPU_TARGET_MS:g} ms: {_verdict(cpu <= CPU_TARGET_MS)}" if n == 1000 else ""))
    print(f"        server CPU s by thread over the rounds (largest first): {res['thread_cpu_s'][:4]}; per device "
          f"and round: fleet host CPU {res['host_ms_per_device']:.1f} ms (its training thread "
          f"{res['train_ms_per_device']:.1f} ms), mosquitto {res['broker_ms_per_update']:.1f} ms")


if __name__ == "__main__":
    main()
