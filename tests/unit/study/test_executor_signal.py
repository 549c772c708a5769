"""SIGTERM to a study stops the run it is executing (the run has a session of its own, so a signal to the
study's process group would not reach it): no orphan trains on. A real child process; the executor's
command is a stand-in that records its pid and sleeps."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from fedpeft_edge.config import RunConfig
from fedpeft_edge.study.executor import ProcessExecutor
from fedpeft_edge.study.grid import PlannedRun

RUN = PlannedRun(0, "sleeper", (), {}, RunConfig(), "0" * 64)


class _Sleeper(ProcessExecutor):
    name = "sleeper"
    poll_s = 0.05

    def __init__(self, pid_file: Path) -> None:
        self.pid_file = pid_file

    def command(self, run: PlannedRun, config_path: Path, run_dir: Path, timeout_s: float) -> list[str]:
        code = f"import os, time; open({str(self.pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(120)"
        return [sys.executable, "-c", code]


def test_sigterm_to_the_study_stops_the_run(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"

    def terminate_when_started() -> None:
        deadline = time.monotonic() + 30
        while not pid_file.exists() or not pid_file.read_text():
            if time.monotonic() > deadline:
                return
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    killer = threading.Thread(target=terminate_when_started, daemon=True)
    killer.start()
    with pytest.raises(KeyboardInterrupt):
        _Sleeper(pid_file).execute(RUN, tmp_path / "c.yaml", tmp_path / "run", tmp_path / "log.txt",
                                   lambda _r: None, timeout_s=60)
    child = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)
    assert signal.getsignal(signal.SIGTERM) == before  # the study's handler is gone with the run
