"""An emulated arm64 device takes part in a run: an x86 server, one x86 agent and one aarch64 agent (a Debian arm64
root under qemu-user, built and provisioned by scripts/arm64_device.sh with scripts/install_agent.sh --platform rpi
from PyPI's aarch64 wheels) complete 2 rounds of bias-tuning on the offline EfficientNet-Lite0 over a provisioned
mosquitto (password file, ACL, signed messages).

The aarch64 device computes the same backbone fingerprint as the x86 ones (its doctor says so, the server admits
it, the run's summary holds it), its updates are accepted and aggregated in both rounds, and its profile says
aarch64. Skipped, with the reason, where the emulated device cannot run (not root, no qemu-user-static or
binfmt_misc). The cold build (debootstrap + pip under emulation) is cached between runs: docs/results/arm64.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from fl_processes import REPO, Procs, aggregated_rounds, image_folder, records, run_dir_of, wait_for, write_config

from fedpeft_edge.transport.broker import find_mosquitto, start_broker
from fedpeft_edge.transport.provision import Provisioned, provision

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(3600),
              pytest.mark.skipif(find_mosquitto() is None, reason="needs mosquitto")]

SCRIPT = REPO / "scripts" / "arm64_device.sh"
RUN_ID = "arm64"
X86, ARM = "x86-1", "arm64-1"
BUILD_TIMEOUT_S = 2700  # cold: debootstrap ~3 min + the agent's pip install under emulation (measured: results page)


@pytest.fixture(scope="session")
def arm64_device() -> Path:
    """scripts/arm64_device.sh, with its arm64 root built and the agent installed (cached between runs)."""
    if os.geteuid() != 0:
        pytest.skip("the emulated arm64 device needs root (chroot, mounts, binfmt_misc)")
    check = subprocess.run(["bash", str(SCRIPT), "check"], capture_output=True, text=True, timeout=120)
    if check.returncode != 0:
        pytest.skip(f"no emulated arm64 device on this host: {(check.stdout + check.stderr).strip()}")
    build = subprocess.run(["bash", str(SCRIPT), "build"], capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    if build.returncode != 0:
        pytest.fail(f"arm64_device.sh build failed ({build.returncode}):\n{build.stdout[-3000:]}\n"
                    f"{build.stderr[-3000:]}")
    return SCRIPT


def _configs(tmp: Path, prov: Provisioned, port: int) -> dict[str, Path]:
    out = {}
    for node in ("0", X86, ARM):
        comm = yaml.safe_load((prov.node_dir(node) / "comm_args.yaml").read_text())["comm_args"]
        out[node] = write_config(
            tmp / f"{RUN_ID}-{node}.yaml", port, RUN_ID,
            data_args={"max_train_samples": 60, "max_test_samples": 60},
            model_args={"model": "tf_efficientnet_lite0", "num_classes": 10, "weights": "efficientnet_lite0_package",
                        "model_kwargs": {}},
            train_args={"comm_round": 2, "min_devices": 2, "min_updates": 2, "round_timeout_s": 900,
                        "join_timeout_s": 1200, "learning_rate": 0.01},
            # Emulated code runs many times slower: a generous keepalive for its network thread.
            comm_args={"broker_port": port, "keepalive_s": 30, **comm},
        )
    return out


def _doctor_rows(stdout: str) -> dict[str, dict[str, str]]:
    return {r["check"]: r for r in json.loads(stdout[stdout.index("["):])}


def _fingerprint(rows: dict[str, dict[str, str]]) -> str:
    return rows["backbone fingerprint"]["detail"].split()[0]


def test_an_emulated_arm64_device_trains_beside_an_x86_one(arm64_device: Path, tmp_path: Path) -> None:
    prov = provision(tmp_path / "prov", [X86, ARM], run_id=RUN_ID)
    data = {X86: image_folder(tmp_path / "data-x86", 0, per_class=3),
            ARM: image_folder(tmp_path / "data-arm64", 1, per_class=3)}
    device = ["bash", str(arm64_device), "--bind", str(tmp_path)]
    with start_broker(secure_dir=prov.root) as broker:
        cfgs = _configs(tmp_path, prov, broker.port)
        run_dir = run_dir_of(cfgs["0"])
        x86_doctor = subprocess.run(
            [sys.executable, "-m", "device_agents.main", "doctor", "--config", str(cfgs[X86]), "--device-id", X86,
             "--json"], capture_output=True, text=True, timeout=300, cwd=REPO)
        x86_fp = _fingerprint(_doctor_rows(x86_doctor.stdout))
        arm_doctor = subprocess.run(
            [*device, "doctor", "--config", str(cfgs[ARM]), "--device-id", ARM, "--fingerprint", x86_fp,
             "--state-dir", str(tmp_path / "state-arm64"), "--json"],
            capture_output=True, text=True, timeout=900)
        assert arm_doctor.returncode == 0, arm_doctor.stdout + arm_doctor.stderr
        rows = _doctor_rows(arm_doctor.stdout)
        assert rows["backbone fingerprint"]["status"] == "OK", rows  # aarch64 builds x86's frozen backbone
        assert rows["MQTT connect"]["status"] == "OK", rows  # its provisioned credentials reach the host's broker

        procs = Procs(tmp_path / "logs")
        try:
            server = procs.server(cfgs["0"])
            wait_for("the server to connect", lambda: "connected; waiting" in procs.log("server"), 120, procs)
            procs.start(X86, "device_agents.main", "--config", str(cfgs[X86]), "--device-id", X86,
                        "--dataset", "imagefolder", "--data-dir", str(data[X86]))
            procs.command(ARM, [*device, "run-agent", "--config", str(cfgs[ARM]), "--device-id", ARM,
                                "--dataset", "imagefolder", "--data-dir", str(data[ARM]),
                                "--state-dir", str(tmp_path / "state-arm64")])
            wait_for("the run to finish", lambda: (run_dir / "summary.json").exists() and server.poll() is not None,
                     1800, procs)
            assert server.returncode == 0, procs.logs()
            assert procs.procs[ARM].wait(timeout=300) == 0, procs.logs()
        finally:
            procs.stop_all()

    assert aggregated_rounds(run_dir) == [1, 2], procs.logs()
    joins: dict[str, Any] = {r["device_id"]: r for r in records(run_dir, "join")}
    assert joins[ARM]["accepted"] and joins[X86]["accepted"], joins  # the server compared the full fingerprint
    assert joins[ARM]["profile"]["machine"] == "aarch64", joins[ARM]["profile"]
    assert joins[X86]["profile"]["machine"] == "x86_64", joins[X86]["profile"]
    accepted = {(r["round"], r["device_id"]) for r in records(run_dir, "device_round") if r["status"] == "accepted"}
    assert accepted == {(1, X86), (1, ARM), (2, X86), (2, ARM)}, records(run_dir, "device_round")
    assert all(r["accepted"] == 2 for r in records(run_dir, "round") if r["status"] == "aggregated")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["backbone_fingerprint"].startswith(x86_fp), (summary["backbone_fingerprint"], x86_fp)
