"""The agent's systemd unit: systemd-analyze accepts it; it never runs as root; bad names are refused."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fedpeft_edge.cli import main as cli_main
from fedpeft_edge.client.service import ServiceSpec, render_systemd_unit
from fedpeft_edge.errors import ConfigError


def _spec(tmp_path: Path, **kw: object) -> ServiceSpec:
    cfg = tmp_path / "run.yaml"
    cfg.write_text("common_args: {run_id: svc}\n")
    args = {"user": "nobody", "config": cfg, "device_id": "jetson-1", "python": Path(sys.executable)}
    return ServiceSpec(**{**args, **kw})  # type: ignore[arg-type]


def test_unit_has_restart_user_state_and_hardening(tmp_path: Path) -> None:
    text = render_systemd_unit(_spec(tmp_path))
    lines = set(text.splitlines())
    for want in ("User=nobody", "Restart=on-failure", "RestartPreventExitStatus=2 3", "StateDirectory=fedpeft-agent",
                 "NoNewPrivileges=yes", "ProtectSystem=strict", "WantedBy=multi-user.target"):
        assert want in lines
    assert f"--config {tmp_path / 'run.yaml'} --device-id jetson-1 --state-dir /var/lib/fedpeft-agent" in text


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is absent (Debian package systemd); the unit cannot be verified here")
def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    unit = tmp_path / "fedpeft-agent-jetson-1.service"
    assert cli_main(["install-service", "--config", str(tmp_path / "run.yaml"), "--device-id", "jetson-1",
                     "--user", "nobody", "--output", str(tmp_path)]) == 2  # the config does not exist yet
    _spec(tmp_path)  # writes run.yaml
    assert cli_main(["install-service", "--config", str(tmp_path / "run.yaml"), "--device-id", "jetson-1",
                     "--user", "nobody", "--output", str(tmp_path)]) == 0
    res = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    problems = [ln for ln in res.stderr.splitlines() if "nobody" not in ln]  # "special user" is only advice
    assert res.returncode == 0 and not problems, res.stderr
    broken = tmp_path / "broken.service"  # the check can fail: a misspelled directive is reported
    broken.write_text(unit.read_text().replace("ProtectClock=", "ProtectClok="))
    res = subprocess.run(["systemd-analyze", "verify", str(broken)], capture_output=True, text=True, timeout=60)
    assert "Unknown key" in res.stderr


def test_root_and_bad_names_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="non-root"):
        _spec(tmp_path, user="root")
    with pytest.raises(ConfigError, match="not a valid name"):
        _spec(tmp_path, device_id="a b")
    with pytest.raises(ConfigError, match="absolute"):
        _spec(tmp_path, python=Path("venv/bin/python"))
