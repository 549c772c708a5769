"""Run configs the benchmarks share: a real run of a tiny random-init ViT on digits (training takes little
time, so the figures are the protocol's), each benchmark changing only what it measures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

TINY_VIT = {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 4, "num_heads": 4}


def tiny_vit_run(path: Path, run_id: str, port: int, agents: int, rounds: int, *, vit: dict[str, Any] = TINY_VIT,
                 **sections: dict[str, Any]) -> Path:
    """Write the run config to `path` (run directory beside it); `sections` update the named sections."""
    cfg: dict[str, dict[str, Any]] = {
        "common_args": {"run_id": run_id, "random_seed": 0},
        "data_args": {"dataset": "digits", "partition_method": "iid", "image_size": 32, "batch_size": 32,
                      "min_samples_per_client": 5},
        "model_args": {"model": "vit_tiny_patch16_224", "num_classes": 10, "weights": "none", "model_kwargs": vit},
        "peft_args": {"method": "bias"},
        "train_args": {"client_num_in_total": agents, "client_num_per_round": agents, "comm_round": rounds,
                       "min_devices": agents, "min_updates": agents, "round_timeout_s": 300, "learning_rate": 0.05},
        "comm_args": {"broker_port": port},
        "device_args": {"num_threads": 1, "measure_latency": False},
        "tracking_args": {"run_dir": str(path.parent / "runs"), "log_level": "WARNING"},
    }
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    path.write_text(yaml.safe_dump(cfg))
    return path
