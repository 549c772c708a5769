"""Runs that do not complete exit non-zero and say why: `fedpeft-server` after a join timeout with no device,
and `simulate` when every device fails the same way (the run ends at the second identical attempt, not after
max_round_retries deadlines)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from fl_processes import REPO, records, write_config
from PIL import Image

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]


def _run(*argv: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", *argv], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_a_server_whose_devices_never_join_exits_non_zero(mosquitto_broker: Any, tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "run.yaml", mosquitto_broker.port, "nobody", train_args={"join_timeout_s": 2})
    done = _run("server_app.main", "--config", str(cfg))
    assert done.returncode == 1, done.stdout + done.stderr
    assert "fedpeft-server: error: the run ended after 0 of 3 rounds: join timeout" in done.stderr


def _tree(root: Path, classes: int, per_class: int) -> Path:
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (16, 16), color=(60 * c, 4 * i, 9)).save(root / f"c{c}" / f"{i}.png")
    return root


def test_the_same_error_on_every_device_ends_simulate_at_once(tmp_path: Path) -> None:
    """Four class folders for a 3-class head: every device fails its first batch with the same error."""
    cfg = write_config(tmp_path / "run.yaml", 1883, "broken", model_args={"num_classes": 3},
                       data_args={"dataset": "imagefolder", "data_cache_dir": str(_tree(tmp_path / "img", 4, 12)),
                                  "max_train_samples": None, "max_test_samples": None},
                       train_args={"round_timeout_s": 600, "max_round_retries": 5, "comm_round": 2})
    t0 = time.monotonic()
    done = _run("fedpeft_edge.cli", "simulate", "--config", str(cfg))
    assert done.returncode == 1, done.stdout + done.stderr
    assert time.monotonic() - t0 < 200  # one 600 s deadline would already be longer
    assert "the run ended after 0 of 2 rounds: round 1 failed twice in a row on every selected device" in done.stderr
    run_dir = Path(yaml.safe_load(cfg.read_text())["tracking_args"]["run_dir"]) / "broken"
    assert [r["attempt"] for r in records(run_dir, "round")] == [0, 1]  # not max_round_retries + 1 attempts
    assert "out of bounds" in json.loads((run_dir / "summary.json").read_text())["end_reason"]
