"""`fedpeft-edge simulate` of the quickstart (EfficientNet-Lite0, BatchNorm) with DP-SGD and bias tuning completes.

Before per-sample gradients through frozen BatchNorm, every device failed this on every attempt and the server
retried six times, ended "after 0 rounds" and exited 0. ~40 s CPU; minutes on a loaded machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]

QUICKSTART = Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml"


def test_quickstart_bias_tuning_under_dp_completes_its_round(tmp_path: Path) -> None:
    cfg = yaml.safe_load(QUICKSTART.read_text())
    assert cfg["model_args"]["model"] == "tf_efficientnet_lite0" and cfg["peft_args"]["method"] == "bias"
    cfg["dp_args"] = {"enabled": True, "target_epsilon": 5}
    cfg["tracking_args"]["run_dir"] = str(tmp_path / "runs")
    # devices train one after the other in simulate: a loaded machine must not turn this into a timeout test
    cfg["train_args"]["round_timeout_s"] = 800
    path = tmp_path / "quickstart_dp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "fedpeft_edge.cli", "simulate", "--config", str(path),
                           "--devices", "2", "--rounds", "1"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=850)
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = tmp_path / "runs" / cfg["common_args"]["run_id"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds"] == 1 and summary["end_reason"] == "completed", summary
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in records if r.get("kind") == "device_round" and r.get("status") == "accepted"]
    assert {r["device_id"] for r in trained} == {"dev0", "dev1"}, [r.get("status") for r in records]
    assert all(0 < r["epsilon"] <= 5.0 for r in trained)
