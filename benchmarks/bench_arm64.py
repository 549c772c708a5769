"""The emulated arm64 device (scripts/arm64_device.sh) beside this x86 host: the agent venv's installed size
against this interpreter's (the server's) venv, the agent's import time, and `fedpeft-agent doctor`'s wall time,
peak RSS and report on each. Emulated figures (qemu-user) are relative only: no real aarch64 board was measured.

Needs root and a built device (`scripts/arm64_device.sh build`); run as
`PYTHONPATH=. python benchmarks/bench_arm64.py` (figures in docs/results/arm64.md).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import yaml

from fedpeft_edge.transport.broker import start_broker

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "arm64_device.sh"
VENV_IN = "/opt/fedpeft-agent/venv"
IMPORT = ("import time; t = time.perf_counter(); import torch, timm, device_agents.main, fedpeft_edge.client.manager; "
          "print(time.perf_counter() - t)")


def du_mb(path: Path) -> float:
    out = subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True, check=True).stdout
    return int(out.split()[0]) / 2**20


def run_sampled(argv: list[str], env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess[str], float,
                                                                           float]:
    """Run argv; its wall time and peak RSS (MB, polled every 0.1 s; for an emulated process, qemu's RSS)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    peak = [0.0]

    def sample() -> None:
        p = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                peak[0] = max(peak[0], p.memory_info().rss / 2**20)
            except psutil.Error:
                return
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate(timeout=1800)
    sampler.join()
    done = subprocess.CompletedProcess(argv, proc.returncode, out, err)
    return done, time.perf_counter() - t0, peak[0]


def import_s(python: list[str], env: dict[str, str] | None, repeats: int) -> list[float]:
    """Seconds to import the agent, `repeats` times in fresh interpreters (the first one is a cold cache)."""
    return [float(subprocess.run([*python, "-c", IMPORT], capture_output=True, text=True, env=env, check=True,
                                 cwd=REPO).stdout.split()[-1]) for _ in range(repeats)]


def write_config(path: Path, port: int) -> Path:
    cfg = {"common_args": {"run_id": "bench-arm64", "random_seed": 0},
           "data_args": {"dataset": "imagefolder", "image_size": 32, "batch_size": 16},
           "model_args": {"model": "tf_efficientnet_lite0", "num_classes": 10, "weights": "efficientnet_lite0_package"},
           "peft_args": {"method": "bias"},
           "comm_args": {"broker_port": port},
           "device_args": {"num_threads": 1}}
    path.write_text(yaml.safe_dump(cfg))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3, help="import timings per side (the first is cold)")
    args = parser.parse_args()
    out = subprocess.run(["bash", str(SCRIPT), "root"], capture_output=True, text=True, check=True).stdout
    root = Path(out.strip())
    venv = root / VENV_IN.lstrip("/")
    native_env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    agent_mb, server_mb = du_mb(venv), du_mb(Path(sys.prefix).resolve())
    print(f"installed size: arm64 agent venv {agent_mb:.0f} MB ({venv}); this server venv {server_mb:.0f} MB "
          f"({Path(sys.prefix).resolve()}); ratio {agent_mb / server_mb:.2f}")
    with tempfile.TemporaryDirectory() as tmp:
        device = ["bash", str(SCRIPT), "--bind", tmp]
        emu = import_s([*device, "exec", f"{VENV_IN}/bin/python"], None, args.repeats)
        nat = import_s([sys.executable], native_env, args.repeats)
        print(f"import torch+timm+agent: emulated arm64 {', '.join(f'{s:.1f}' for s in emu)} s; "
              f"native x86 {', '.join(f'{s:.1f}' for s in nat)} s; warm ratio "
              f"{statistics.median(emu[1:] or emu) / statistics.median(nat[1:] or nat):.1f}x")
        with start_broker() as broker:
            cfg = write_config(Path(tmp) / "run.yaml", broker.port)
            doctor = ["doctor", "--config", str(cfg), "--device-id", "bench", "--state-dir", tmp, "--json"]
            nat_res, nat_s, nat_rss = run_sampled([sys.executable, "-m", "device_agents.main", *doctor], native_env)
            emu_res, emu_s, emu_rss = run_sampled([*device, *doctor])
        print(f"doctor: emulated arm64 {emu_s:.1f} s, peak RSS {emu_rss:.0f} MB (qemu's); native x86 {nat_s:.1f} s, "
              f"peak RSS {nat_rss:.0f} MB; exit codes {emu_res.returncode} / {nat_res.returncode}")
        rows = json.loads(emu_res.stdout[emu_res.stdout.index("["):])
        print("emulated arm64 doctor:")
        for r in rows:
            print(f"  {r['check']:<22}{r['status']:<6}{r['detail']}")


if __name__ == "__main__":
    main()
