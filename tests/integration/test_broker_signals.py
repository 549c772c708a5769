"""`fedpeft-edge broker` on SIGTERM or SIGINT stops its mosquitto and removes its temporary directory (it once
left mosquitto listening and the directory behind)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedpeft_edge.transport.broker import find_mosquitto

REPO = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60),
              pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed")]


def _mosquitto_pids(tmp: Path) -> list[int]:
    """mosquitto processes whose config lies under tmp (the broker command's temp directory)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if cmd and cmd[0].endswith(b"mosquitto") and any(str(tmp).encode() in part for part in cmd):
                pids.append(int(entry.name))
    return pids


def _accepts(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=lambda s: signal.Signals(s).name)
def test_the_broker_command_cleans_up_on_a_signal(tmp_path: Path, sig: int) -> None:
    env = {**os.environ, "TMPDIR": str(tmp_path), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "fedpeft_edge.cli", "broker", "--port", "0", "--kind",
                             "mosquitto"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        port = int(re.search(r"listening on 127\.0\.0\.1:(\d+)", line).group(1))  # type: ignore[union-attr]
        assert _accepts(port) and _mosquitto_pids(tmp_path)
        assert list(tmp_path.glob("fedpeft-mosquitto-*"))
        proc.send_signal(sig)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    deadline = time.monotonic() + 5
    while _mosquitto_pids(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _mosquitto_pids(tmp_path), "mosquitto left running"
    assert not _accepts(port), "the port still accepts connections"
    assert not list(tmp_path.glob("fedpeft-mosquitto-*")), "temp directory left behind"
