"""scripts/install_agent.sh refuses, before it creates anything, the installs that cannot work on a device."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "install_agent.sh"
R36 = ("# R36 (release), REVISION: 3.0, GCID: 36191598, BOARD: generic, EABI: aarch64"
       ", DATE: Mon May  6 17:34:21 UTC 2024\n")
R35 = ("# R35 (release), REVISION: 4.1, GCID: 33958178, BOARD: t186ref, EABI: aarch64"
       ", DATE: Tue Aug  1 19:57:35 UTC 2023\n")


def _run(tmp_path: Path, *args: str, release: str | None = None, python: str = sys.executable
         ) -> subprocess.CompletedProcess[str]:
    rel = tmp_path / "nv_tegra_release"
    if release is not None:
        rel.write_text(release)
    env = {**os.environ, "NV_TEGRA_RELEASE": str(rel)}
    return subprocess.run(["bash", str(SCRIPT), "--venv", str(tmp_path / "venv"), "--python", python, *args],
                          capture_output=True, text=True, timeout=60, env=env)


def test_jetson_without_nvidia_wheels_is_refused(tmp_path: Path) -> None:
    res = _run(tmp_path, release=R36)
    assert res.returncode == 2 and "--torch-wheel" in res.stderr and "R36" in res.stderr
    res = _run(tmp_path, "--torch-wheel", "torch-2.4.0-cp310-linux_aarch64.whl", release=R36)
    assert res.returncode == 2 and "--torchvision-wheel" in res.stderr
    assert not (tmp_path / "venv").exists()


def test_jetpack5_python_is_below_the_floor(tmp_path: Path) -> None:
    fake = tmp_path / "python3.8"  # answers like JetPack 5's Python 3.8
    fake.write_text('#!/bin/sh\ncase "$2" in *print*) echo 3.8 ;; *) exit 1 ;; esac\n')
    fake.chmod(0o755)
    res = _run(tmp_path, release=R35, python=str(fake))
    assert res.returncode == 2 and "JetPack 5" in res.stderr and "3.10" in res.stderr


@pytest.mark.parametrize(("args", "message"), [(("--platform", "tpu"), "use jetson, cpu"),
                                               (("--torchvision-wheel", "tv.whl"), "needs --torch-wheel"),
                                               (("--torch-version", "2.10.0", "--torch-wheel", "t.whl"),
                                                "exclude each other"),
                                               (("--frobnicate",), "unknown option")])
def test_bad_arguments_are_refused(tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    res = _run(tmp_path, *args)
    assert res.returncode == 2 and message in res.stderr
