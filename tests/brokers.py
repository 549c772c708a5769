"""A real mosquitto broker on a free loopback port for tests (the fixtures in conftest.py use it; tests that start
brokers themselves import it as `brokers`)."""

from __future__ import annotations

import dataclasses
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from fedpeft_edge.transport.broker import wait_accepting

MOSQUITTO = "/usr/sbin/mosquitto"
_START_TIMEOUT_S = 10.0


@dataclasses.dataclass
class RunningBroker:
    """A broker process the fixture started: where to connect and how it was limited."""

    host: str
    port: int
    process: subprocess.Popen[bytes]
    config_path: Path
    log_path: Path
    message_size_limit: int | None = None
    max_packet_size: int | None = None

    def log(self) -> str:
        """The broker's log so far (for failure messages)."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        """Terminate the broker and wait for it; kill it if it does not stop in 5 s."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _mosquitto_path() -> str | None:
    if Path(MOSQUITTO).exists():
        return MOSQUITTO
    return shutil.which("mosquitto")


def start_mosquitto(
    workdir: Path, message_size_limit: int | None = None, max_packet_size: int | None = None
) -> RunningBroker:
    """Start mosquitto on a free loopback port from a generated config; skip the test if it is absent."""
    exe = _mosquitto_path()
    if exe is None:
        pytest.skip("mosquitto is not installed (apt-get install mosquitto); broker tests need a real broker")
    workdir.mkdir(parents=True, exist_ok=True)
    host = "127.0.0.1"
    for _attempt in range(3):  # a free port can be taken between probe and bind
        port = free_port()
        lines = [f"listener {port} {host}", "allow_anonymous true", "persistence false",
                 "log_dest stderr", "log_type error", "log_type warning", "log_type notice",
                 "max_inflight_messages 0", "max_queued_messages 10000"]
        if message_size_limit is not None:
            lines.append(f"message_size_limit {message_size_limit}")
        if max_packet_size is not None:
            lines.append(f"max_packet_size {max_packet_size}")
        conf = workdir / f"mosquitto_{port}.conf"
        conf.write_text("\n".join(lines) + "\n")
        log_path = workdir / f"mosquitto_{port}.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen([exe, "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT)
        if wait_accepting(host, port, _START_TIMEOUT_S, alive=lambda p=proc: p.poll() is None):
            return RunningBroker(host, port, proc, conf, log_path, message_size_limit, max_packet_size)
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=5)
    raise RuntimeError(f"mosquitto did not start; last log:\n{log_path.read_text(errors='replace')}")
