"""Helpers for integration tests: a tiny run config, real server and agent processes, waiting on metrics."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from fedpeft_edge.server.runlog import read_metrics

REPO = Path(__file__).resolve().parents[2]

TINY_VIT = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}


def write_config(path: Path, port: int, run_id: str, **sections: dict[str, Any]) -> Path:
    """A small, fast run: a tiny random-init ViT on digits, bias-tuning, 2 devices; sections override."""
    cfg: dict[str, Any] = {
        "common_args": {"run_id": run_id, "random_seed": 3},
        "data_args": {"dataset": "digits", "partition_method": "iid", "image_size": 32, "batch_size": 16,
                      "max_train_samples": 240, "max_test_samples": 100, "min_samples_per_client": 5},
        "model_args": {"model": "vit_tiny_patch16_224", "num_classes": 10, "weights": "none",
                       "model_kwargs": TINY_VIT},
        "peft_args": {"method": "bias"},
        "train_args": {"client_num_in_total": 2, "client_num_per_round": 2, "comm_round": 3,
                       "min_devices": 2, "min_updates": 1, "round_timeout_s": 60, "learning_rate": 0.05},
        "comm_args": {"broker_port": port, "keepalive_s": 5, "reconnect_min_s": 0.5, "reconnect_max_s": 2},
        "device_args": {"num_threads": 1},
        "tracking_args": {"run_dir": str(path.parent / "runs"), "log_level": "INFO"},
    }
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_dir_of(config: Path) -> Path:
    cfg = yaml.safe_load(config.read_text())
    return Path(cfg["tracking_args"]["run_dir"]) / cfg["common_args"]["run_id"]


class Procs:
    """Starts programs as real processes with logs in a directory; kills what is left at the end."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, module: str, *args: str) -> subprocess.Popen[bytes]:
        return self.command(name, [sys.executable, "-m", module, *args])

    def command(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        """Any program (e.g. an emulated device's agent started through its script), logged and stopped alike."""
        log = (self.log_dir / f"{name}.log").open("ab")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        self.procs[name] = p
        return p

    def server(self, config: Path, name: str = "server") -> subprocess.Popen[bytes]:
        return self.start(name, "server_app.main", "--config", str(config))

    def agent(self, config: Path, device_id: str, index: int, *extra: str) -> subprocess.Popen[bytes]:
        return self.start(device_id, "device_agents.main", "--config", str(config), "--device-id", device_id,
                          "--client-index", str(index), *extra)

    def log(self, name: str) -> str:
        return (self.log_dir / f"{name}.log").read_text(errors="replace")

    def logs(self) -> str:
        return "\n".join(f"----- {n} -----\n{self.log(n)[-4000:]}" for n in self.procs)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        p = self.procs[name]
        if p.poll() is None:
            p.send_signal(sig)
            p.wait(timeout=20)

    def stop_all(self) -> None:
        for name in list(self.procs):
            try:
                self.kill(name, signal.SIGTERM)
            except subprocess.TimeoutExpired:
                self.kill(name, signal.SIGKILL)


def records(run_dir: Path, kind: str | None = None) -> list[dict[str, Any]]:
    """The run's metrics records so far ([] before the server wrote any)."""
    return read_metrics(run_dir, kind) if (run_dir / "metrics.jsonl").exists() else []


def wait_for(what: str, cond: Callable[[], bool], timeout: float, procs: Procs) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n{procs.logs()}")


def aggregated_rounds(run_dir: Path) -> list[int]:
    return [r["round"] for r in records(run_dir, "round") if r.get("status") == "aggregated"]


def restart_mosquitto(config_path: Path, port: int, log_path: Path, timeout: float = 10.0) -> subprocess.Popen[bytes]:
    """Start mosquitto again from the config a fixture wrote (same port); the caller stops it."""
    import socket

    with log_path.open("ab") as log:
        proc = subprocess.Popen(["mosquitto", "-c", str(config_path)], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"mosquitto did not come back on port {port}")


def image_folder(root: Path, seed: int = 0, classes: int = 10, per_class: int = 4) -> Path:
    """An image-folder data set (`root/<class>/<i>.png`, 32x32 random RGB) for a device's `data_args.data_dir`."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in range(classes):
        (root / str(c)).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 255, size=(32, 32, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / str(c) / f"{i}.png")
    return root
