"""DP-SGD over MQTT for every method that can run under DP on a ViT: runs complete, tensors finite and trained."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from fl_processes import Procs, aggregated_rounds, run_dir_of, wait_for, write_config

from fedpeft_edge.server.checkpoint import load_checkpoint

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]

METHODS = ("head", "bias", "adapter", "prompt", "lora")


@pytest.fixture
def procs(tmp_path: Path):  # type: ignore[no-untyped-def]
    p = Procs(tmp_path / "logs")
    yield p
    p.stop_all()


def test_dp_run_completes_for_every_method(mosquitto_broker: Any, tmp_path: Path, procs: Procs) -> None:
    """One run per method, side by side on one broker (one server and one agent each), two DP rounds."""
    runs = {}
    for method in METHODS:
        cfg = write_config(
            tmp_path / f"{method}.yaml", mosquitto_broker.port, f"dp-{method}",
            peft_args={"method": method, "adapter": {"width": 8}, "prompt": {"num_tokens": 2},
                       "lora": {"r": 2, "alpha": 4}},
            train_args={"comm_round": 2, "client_num_in_total": 1, "client_num_per_round": 1, "min_devices": 1,
                        "min_updates": 1, "learning_rate": 0.1},
            dp_args={"enabled": True, "noise_multiplier": 0.5, "max_grad_norm": 1.0},
            device_args={"num_threads": 1, "state_dir": str(tmp_path / "state" / method),
                         "measure_latency": False},
        )
        runs[method] = run_dir_of(cfg)
        procs.server(cfg, name=f"server-{method}")
        procs.agent(cfg, f"dev-{method}", 0)
    for method, run_dir in runs.items():
        wait_for(f"{method} summary", (run_dir / "summary.json").exists, 360, procs)
        assert aggregated_rounds(run_dir) == [1, 2], method
        first, second = load_checkpoint(run_dir, 1).state, load_checkpoint(run_dir, 2).state
        for name, t in second.items():
            assert torch.isfinite(t).all(), (method, name)
        trained = [n for n, t in second.items() if not torch.equal(t, first[n])]
        assert trained == list(second), (method, sorted(set(second) - set(trained)))
        if method == "lora":
            assert any("lora_" in n for n in trained)
