"""`fedpeft-edge lab` without CAP_NET_ADMIN: a plain error naming what is missing and the fix, no namespace made."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[3]


def _unprivileged(cmd: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return cmd  # an ordinary user has neither capability
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv (util-linux) is needed to drop CAP_NET_ADMIN as root")
    drop = "-net_admin,-sys_admin"
    return [setpriv, f"--bounding-set={drop}", f"--inh-caps={drop}", "--", *cmd]


def test_lab_without_net_admin_says_what_is_missing(tmp_path: Path) -> None:
    cfg = tmp_path / "lab.yaml"
    cfg.write_text(yaml.safe_dump({"lab_args": {"devices": 2, "links": ["1mbit"]},
                                   "train_args": {"client_num_in_total": 2, "client_num_per_round": 2}}))
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    proc = subprocess.run(_unprivileged([sys.executable, "-m", "fedpeft_edge.cli", "lab", "--config", str(cfg)]),
                          capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": path})
    assert proc.returncode == 2, proc.stderr
    assert "CAP_NET_ADMIN" in proc.stderr and "--cap-add NET_ADMIN" in proc.stderr, proc.stderr
