"""scripts/arm64_device.sh refuses bad arguments, and says why a host cannot run the emulated device."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "arm64_device.sh"


def _run(*args: str, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*prefix, "bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(("args", "message"), [((), "no command"), (("frobnicate",), "unknown command"),
                                               (("--frobnicate", "build"), "unknown option")])
def test_bad_arguments_are_refused(args: tuple[str, ...], message: str) -> None:
    res = _run(*args)
    assert res.returncode == 2 and message in res.stderr


def test_the_root_is_per_suite_under_the_cache(tmp_path: Path) -> None:
    res = _run("--cache", str(tmp_path), "--suite", "trixie", "root")
    assert res.returncode == 0 and res.stdout.strip() == f"{tmp_path}/rootfs-trixie"


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux) to drop root")
def test_check_says_why_without_root(tmp_path: Path) -> None:
    nobody = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups")
    res = _run("--cache", str(tmp_path), "check", prefix=nobody)
    assert res.returncode == 1 and "not root" in res.stdout
