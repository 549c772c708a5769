"""The static device profile: real facts on this machine, Jetson facts from a fake root."""

from __future__ import annotations

import json
from pathlib import Path

from fedpeft_edge.metering.device_profile import collect_device_profile


def test_profile_of_this_machine() -> None:
    p = collect_device_profile()
    json.dumps(p)
    assert p["hostname"] and p["os"] and p["cpu_count_logical"] >= 1 and p["ram_total_mb"] > 100
    assert p["torch"] and p["accelerator"].startswith(("cpu:", "cuda:"))
    if not Path("/etc/nv_tegra_release").exists():
        assert p["jetson"] is False and p["l4t_version"] is None and p["jetpack_version"] is None


def test_jetson_facts_from_a_fake_root(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/nv_tegra_release").write_text(
        "# R32 (release), REVISION: 7.1, GCID: 29818004, BOARD: t210ref, EABI: aarch64, "
        "DATE: Sat Feb 19 17:05:08 UTC 2022\n")
    (tmp_path / "proc/device-tree").mkdir(parents=True)
    (tmp_path / "proc/device-tree/model").write_bytes(b"NVIDIA Jetson Nano Developer Kit\x00")
    (tmp_path / "proc/cpuinfo").write_text("processor\t: 0\nmodel name\t: ARMv8 Processor rev 1 (v8l)\n")
    p = collect_device_profile(tmp_path, probe_cuda=False)
    assert p["jetson"] is True and p["l4t_version"] == "32.7.1"
    assert p["device_model"] == "NVIDIA Jetson Nano Developer Kit"
    assert p["cpu_model"] == "ARMv8 Processor rev 1 (v8l)"
