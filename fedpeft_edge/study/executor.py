"""How a study's run is executed: the Executor interface and the `simulate` / real-MQTT executors.

An executor takes one run's config file and run directory, runs it to the end, and passes every record the
run writes to its metrics.jsonl to `on_record` while it runs (the study's live progress). Both shipped
executors run the project's own programs as a child process, so a crashing run never takes the study down:
`simulate` runs `fedpeft-edge simulate --config X.yaml` (server engine and devices in one process), `mqtt`
runs `fedpeft-edge demo --config X.yaml` (a broker, `fedpeft-server` and one `fedpeft-agent` per device).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

from fedpeft_edge.errors import StudyError
from fedpeft_edge.study.grid import PlannedRun

log = logging.getLogger(__name__)

RecordSink = Callable[[dict[str, Any]], None]


class Executor(Protocol):
    """Runs one planned run to its end; raises StudyError when it fails."""

    name: str

    def execute(self, run: PlannedRun, config_path: Path, run_dir: Path, log_path: Path,
                on_record: RecordSink, timeout_s: float) -> None: ...


class ProcessExecutor:
    """Runs a command for the run, following its metrics.jsonl until the process exits."""

    name = "process"
    poll_s = 0.5

    def command(self, run: PlannedRun, config_path: Path, run_dir: Path, timeout_s: float) -> list[str]:
        raise NotImplementedError

    def execute(self, run: PlannedRun, config_path: Path, run_dir: Path, log_path: Path,
                on_record: RecordSink, timeout_s: float) -> None:
        cmd = self.command(run, config_path, run_dir, timeout_s)
        log.debug("run %s: %s", run.run_id, " ".join(cmd))
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("wb") as out, _sigterm_interrupts():
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                    env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
            try:
                code = _follow(proc, run_dir / "metrics.jsonl", on_record, timeout_s, self.poll_s)
            finally:
                _stop(proc)
        if code != 0:
            raise StudyError(f"run {run.run_id}: `{' '.join(cmd[1:4])} ...` exited with code {code}; "
                             f"see its log {log_path}")


class SimulateExecutor(ProcessExecutor):
    """`fedpeft-edge simulate`: the server round engine and every device in one process."""

    name = "simulate"

    def command(self, run: PlannedRun, config_path: Path, run_dir: Path, timeout_s: float) -> list[str]:
        return [sys.executable, "-m", "fedpeft_edge.cli", "simulate", "--config", str(config_path)]


class MqttExecutor(ProcessExecutor):
    """`fedpeft-edge demo`: a real broker, the server program and one agent process per device."""

    name = "mqtt"

    def command(self, run: PlannedRun, config_path: Path, run_dir: Path, timeout_s: float) -> list[str]:
        return [sys.executable, "-m", "fedpeft_edge.cli", "demo", "--config", str(config_path),
                "--run-id", run.run_id, "--run-dir", str(run_dir.parent), "--no-report",
                "--timeout", str(timeout_s)]


EXECUTORS: dict[str, Callable[[], Executor]] = {"simulate": SimulateExecutor, "mqtt": MqttExecutor}


def build_executor(name: str) -> Executor:
    if name not in EXECUTORS:
        raise StudyError(f"unknown executor {name!r}; choose one of {', '.join(EXECUTORS)}")
    return EXECUTORS[name]()


class MetricsTail:
    """Reads the complete lines appended to a metrics.jsonl since the last call (a torn last line waits)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0

    def read_new(self) -> list[dict[str, Any]]:
        try:
            with self.path.open("rb") as fh:
                fh.seek(self._offset)
                data = fh.read()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n") + 1
        self._offset += end
        out = []
        for line in data[:end].splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict):
                out.append(rec)
        return out


def _follow(proc: subprocess.Popen[bytes], metrics: Path, on_record: RecordSink, timeout_s: float,
            poll_s: float) -> int:
    tail = MetricsTail(metrics)
    deadline = time.monotonic() + timeout_s
    while True:
        code = proc.poll()
        for rec in tail.read_new():
            on_record(rec)
        if code is not None:
            return code
        if time.monotonic() > deadline:
            log.error("run still going after %.0fs (study run_timeout_s); stopping it", timeout_s)
            return -1
        time.sleep(poll_s)


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM to the study (a `kill`, systemd, CI) interrupts it like Ctrl-C, so the run's own session (in
    a group of its own, out of reach of a signal to ours) is stopped too instead of training on as an orphan.
    Only on the main thread, where Python can take a signal."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(_sig: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the run's process group (the demo's broker, server and agents too), then SIGKILL."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)
    except ProcessLookupError:
        pass
