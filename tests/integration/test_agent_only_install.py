"""An agent from an agent-only install (a fresh venv: no scikit-learn, matplotlib, onnx or onnxruntime)
completes a round against a server from the full install, over a real mosquitto.

The venv is built once by scripts/install_agent.sh (the documented device install) into REPO/.venv-agent and
reused while its stamp (pyproject.toml, the script, pip's constraints, this Python) matches. It installs
torch from pip's configured index with the same pip configuration as scripts/setup.sh. The agent runs the
worktree's code (PYTHONPATH) on the venv's packages only.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from fl_processes import REPO, Procs, aggregated_rounds, image_folder, run_dir_of, wait_for, write_config

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(1800)]

VENV = REPO / ".venv-agent"
STAMP = VENV / ".fedpeft-agent-stamp"
PIP_CONSTRAINTS = Path("/etc/xdg/pip/constraints.txt")


def _stamp() -> str:
    h = hashlib.sha256(sys.version.encode())
    for p in (REPO / "pyproject.toml", REPO / "scripts" / "install_agent.sh", PIP_CONSTRAINTS):
        h.update(p.read_bytes() if p.exists() else b"-")
    return h.hexdigest()


@pytest.fixture(scope="session")
def agent_python() -> Path:
    want = _stamp()
    if not (STAMP.exists() and STAMP.read_text().strip() == want):
        res = subprocess.run(
            ["bash", str(REPO / "scripts" / "install_agent.sh"), "--venv", str(VENV), "--python", sys.executable,
             "--platform", "cpu", "--torch-index", "default"],
            capture_output=True, text=True, timeout=1500, env={**os.environ, "PYTHONPATH": ""})
        if res.returncode != 0:
            pytest.fail(f"install_agent.sh failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
        STAMP.write_text(want)
    return VENV / "bin" / "python"


def _agent_env() -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}, "PYTHONPATH": str(REPO),
            "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def test_agent_only_venv_lacks_the_server_stack(agent_python: Path) -> None:
    code = ("import importlib.util as u; "
            "print([m for m in ('sklearn', 'matplotlib', 'onnx', 'onnxruntime', 'amqtt') if u.find_spec(m)])")
    out = subprocess.run([str(agent_python), "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


#: Packages and modules that need an extra (onnx, server, tracking) and so may not import from the agent-only
#: venv; everything else on the device path must.
SERVER_ONLY = ("fedpeft_edge.export", "fedpeft_edge.cli.export", "fedpeft_edge.report", "fedpeft_edge.cli.report",
               "fedpeft_edge.dashboard", "fedpeft_edge.cli.dashboard", "fedpeft_edge.tracking",
               "fedpeft_edge.lab.report", "fedpeft_edge.study.report")


def _server_only(name: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in SERVER_ONLY)
_IMPORT_ALL = """
import importlib, json, pkgutil, fedpeft_edge, device_agents
mods = [m.name for pkg, p in ((fedpeft_edge, "fedpeft_edge."), (device_agents, "device_agents."))
        for m in pkgutil.walk_packages(pkg.__path__, p) if not m.name.endswith("__main__")]
bad = {}
for name in mods:
    try:
        importlib.import_module(name)
    except ImportError as exc:
        bad[name] = str(exc)
print(json.dumps({"modules": len(mods), "failed": bad}))
"""


def test_every_device_module_imports_without_the_extras(agent_python: Path) -> None:
    import json

    out = subprocess.run([str(agent_python), "-c", _IMPORT_ALL], capture_output=True, text=True, timeout=300,
                         env=_agent_env(), cwd=REPO.parent, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["modules"] > 50
    assert all(_server_only(n) for n in result["failed"]), result["failed"]  # e.g. data/ importing sklearn at the top


def test_agent_only_install_completes_a_round(agent_python: Path, mosquitto_broker: Any, tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "run.yaml", mosquitto_broker.port, "agentonly",
                       train_args={"client_num_in_total": 1, "client_num_per_round": 1, "comm_round": 1,
                                   "min_devices": 1, "min_updates": 1})
    run_dir = run_dir_of(cfg)
    data = image_folder(tmp_path / "device-data")
    procs = Procs(tmp_path / "logs")
    try:
        procs.server(cfg)  # the full install: this interpreter
        doctor = subprocess.run(
            [str(agent_python), "-m", "device_agents.main", "doctor", "--config", str(cfg), "--device-id", "edge1"],
            capture_output=True, text=True, timeout=300, env=_agent_env(), cwd=tmp_path)
        assert doctor.returncode == 0, doctor.stdout + doctor.stderr
        assert "MQTT connect          OK" in doctor.stdout
        log = (procs.log_dir / "edge1.log").open("ab")
        procs.procs["edge1"] = subprocess.Popen(
            [str(agent_python), "-m", "device_agents.main", "--config", str(cfg), "--device-id", "edge1",
             "--dataset", "imagefolder", "--data-dir", str(data)],
            stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path, env=_agent_env())
        wait_for("round 1 aggregated", lambda: 1 in aggregated_rounds(run_dir), 600, procs)
        wait_for("summary.json", (run_dir / "summary.json").exists, 120, procs)
        assert procs.procs["edge1"].wait(timeout=60) == 0, procs.logs()
    finally:
        procs.stop_all()
    assert "no ONNX inference latency" in procs.log("edge1")  # the optional onnx extra is really absent
    # The doctor's fingerprint is the one the server accepted at join: it matches the run's summary.
    after = subprocess.run(
        [str(agent_python), "-m", "device_agents.main", "doctor", "--config", str(cfg), "--device-id", "edge1",
         "--server-summary", str(run_dir / "summary.json")],
        capture_output=True, text=True, timeout=300, env=_agent_env(), cwd=tmp_path)
    assert after.returncode == 0 and "matches the run's" in after.stdout, after.stdout + after.stderr
    assert "server presence (OFFLINE)" in after.stdout  # the finished server's retained last will
