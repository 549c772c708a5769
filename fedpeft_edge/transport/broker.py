"""A local MQTT broker for demos and tests: mosquitto when installed, else embedded amqtt; or RabbitMQ nodes.

Broker processes get the file-descriptor limit (RLIMIT_NOFILE raised to the hard limit) and connection caps
(mosquitto `max_connections -1`) that 1000 devices need.
"""

from __future__ import annotations

import asyncio
import dataclasses
import getpass
import logging
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Literal

from fedpeft_edge.errors import BrokerError
from fedpeft_edge.transport.rabbitmq import start_rabbitmq, with_nofile

log = logging.getLogger(__name__)

BrokerKind = Literal["auto", "mosquitto", "amqtt", "rabbitmq"]
_MOSQUITTO_PATHS = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")


def find_mosquitto() -> str | None:
    """Path of the mosquitto executable, or None."""
    for path in _MOSQUITTO_PATHS:
        if Path(path).exists():
            return path
    return shutil.which("mosquitto")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_accepting(host: str, port: int, timeout_s: float, alive: Any = None) -> bool:
    """True once a TCP connection to host:port succeeds within timeout_s (False early if alive() is False)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if alive is not None and not alive():
            return False
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


@dataclasses.dataclass
class BrokerHandle:
    """A running local broker: connect to `host:port`; `stop()` (or leaving a `with` block) ends it."""

    host: str
    port: int
    kind: str
    message_size_limit: int | None
    _stop: Any = dataclasses.field(repr=False)

    def stop(self) -> None:
        self._stop()

    def __enter__(self) -> BrokerHandle:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()


def start_broker(
    port: int | None = None,
    message_size_limit: int | None = None,
    host: str = "127.0.0.1",
    kind: BrokerKind = "auto",
    timeout_s: float = 10.0,
    secure_dir: str | Path | None = None,
    bind_client_ids: bool = True,
) -> BrokerHandle:
    """Start a broker on host:port (port None = a free one); mosquitto if installed, else embedded amqtt.

    `message_size_limit` (mosquitto only) caps a PUBLISH payload, like a cloud broker does, to prove chunking.
    `secure_dir` (mosquitto only): a `fedpeft-edge provision` directory; anonymous access off, its password
    file and ACL on, and a TLS listener when it was provisioned with TLS; a client id is its user name
    (`bind_client_ids`; tests that share one device's credentials between two clients turn it off), connections
    are bounded and PUBLISH payloads limited to SECURE_MESSAGE_SIZE_LIMIT unless `message_size_limit` says.
    """
    if kind == "rabbitmq":
        if secure_dir is not None:
            raise BrokerError("--secure configures mosquitto; for RabbitMQ set up its users and topic permissions "
                              "as the README's RabbitMQ ACL section says")
        return _start_rabbitmq(port, host, message_size_limit, max(timeout_s, 120.0))
    port = port or free_port(host)
    exe = find_mosquitto()
    if kind == "mosquitto" and exe is None:
        raise BrokerError("mosquitto is not installed (apt-get install mosquitto); or use kind='amqtt'")
    if secure_dir is not None and (exe is None or kind == "amqtt"):
        raise BrokerError("a secure broker (password file, ACL, TLS) needs mosquitto: apt-get install mosquitto")
    if exe is not None and kind != "amqtt":
        return _start_mosquitto(exe, host, port, message_size_limit, timeout_s, secure_dir, bind_client_ids)
    if message_size_limit is not None:
        log.warning("amqtt has no message size limit; message_size_limit=%s is ignored", message_size_limit)
    return _start_amqtt(host, port, timeout_s)


def _mosquitto_config(
    host: str, port: int, message_size_limit: int | None, secure_dir: str | Path | None = None,
    bind_client_ids: bool = True,
) -> str:
    lines = [f"listener {port} {host}", "persistence false", "log_dest stderr",
             "set_tcp_nodelay true", "max_inflight_messages 0", "max_queued_messages 10000"]
    if secure_dir is None:
        lines += ["max_connections -1", "allow_anonymous true"]
    else:
        lines += _secure_lines(Path(secure_dir), bind_client_ids)
        if message_size_limit is None:
            message_size_limit = SECURE_MESSAGE_SIZE_LIMIT
    if message_size_limit is not None:
        lines.append(f"message_size_limit {message_size_limit}")
    return "\n".join(lines) + "\n"


def _secure_lines(secure_dir: Path, bind_client_ids: bool = True) -> list[str]:
    from fedpeft_edge.transport.provision import load_provisioned

    prov = load_provisioned(secure_dir)
    broker = prov.root / "broker"
    # Started as root, mosquitto drops to user `mosquitto`, which cannot read the 0600 secrets provisioning
    # wrote as us: it stays the user that owns them (a no-op for a non-root user).
    # A client id is its user name (a device cannot knock another off by reusing its id); connections are
    # bounded (a device and a reconnect each, the server, a margin), not unlimited.
    lines = [f"user {getpass.getuser()}", "allow_anonymous false", f"password_file {broker / 'passwd'}",
             f"acl_file {broker / 'acl'}", f"use_username_as_clientid {str(bind_client_ids).lower()}",
             f"max_connections {2 * (len(prov.devices) + 1) + 16}"]
    if prov.tls:
        tls = broker / "tls"
        lines += [f"cafile {tls / 'ca.crt'}", f"certfile {tls / 'broker.crt'}", f"keyfile {tls / 'broker.key'}",
                  "require_certificate true", "tls_version tlsv1.2", "use_identity_as_username true"]
        if (tls / "crl.pem").exists():
            lines.append(f"crlfile {tls / 'crl.pem'}")
    return lines


#: A provisioned broker's PUBLISH payload limit without --message-size-limit: a chunk of comm_args.chunk_bytes'
#: default (1 MiB) with its signature envelope and headers; larger messages travel as chunks.
SECURE_MESSAGE_SIZE_LIMIT = 1024 * 1024 + 4096


def _start_mosquitto(
    exe: str, host: str, port: int, limit: int | None, timeout_s: float, secure_dir: str | Path | None = None,
    bind_client_ids: bool = True,
) -> BrokerHandle:
    workdir = Path(tempfile.mkdtemp(prefix="fedpeft-mosquitto-"))
    conf = workdir / "mosquitto.conf"
    conf.write_text(_mosquitto_config(host, port, limit, secure_dir, bind_client_ids))
    logfile = (workdir / "mosquitto.log").open("wb")
    proc = subprocess.Popen(with_nofile([exe, "-c", str(conf)]), stdout=logfile, stderr=subprocess.STDOUT)
    logfile.close()

    def stop() -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        shutil.rmtree(workdir, ignore_errors=True)

    if not wait_accepting(host, port, timeout_s, alive=lambda: proc.poll() is None):
        text = (workdir / "mosquitto.log").read_text(errors="replace")[-2000:]
        stop()
        raise BrokerError(f"mosquitto did not start on {host}:{port} within {timeout_s:g} s "
                          f"(port taken?); its log:\n{text}")
    log.info("mosquitto (pid %d) listening on %s:%d", proc.pid, host, port)
    return BrokerHandle(host, port, "mosquitto", limit, stop)


def _start_rabbitmq(port: int | None, host: str, limit: int | None, timeout_s: float) -> BrokerHandle:
    if limit is not None:
        log.warning("message_size_limit=%s is a mosquitto option; RabbitMQ keeps its own limits", limit)
    cluster = start_rabbitmq(port, host, timeout_s)
    node = cluster.nodes[0]
    return BrokerHandle(node.host, node.port, "rabbitmq", None, cluster.stop)


def _start_amqtt(host: str, port: int, timeout_s: float) -> BrokerHandle:
    try:
        from amqtt.broker import Broker
    except ImportError as exc:
        raise BrokerError("neither mosquitto nor amqtt is installed; install one, or point at your broker") \
            from exc
    ready = threading.Event()
    errors: list[BaseException] = []
    stop_holder: dict[str, Any] = {}

    async def serve() -> None:
        config = {"listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}},
                  "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}}}
        broker = Broker(config)
        stop_event = asyncio.Event()
        loop = asyncio.get_running_loop()
        stop_holder["stop"] = lambda: loop.call_soon_threadsafe(stop_event.set)
        await broker.start()
        ready.set()
        await stop_event.wait()
        await broker.shutdown()

    def run() -> None:
        try:
            asyncio.run(serve())
        except BaseException as exc:  # reported to the starting thread
            errors.append(exc)
            ready.set()

    thread = threading.Thread(target=run, name=f"amqtt-{port}", daemon=True)
    thread.start()

    def stop() -> None:
        if "stop" in stop_holder:
            stop_holder["stop"]()
        thread.join(timeout=10)

    if not ready.wait(timeout_s) or errors:  # start() returns once the listener is bound
        stop()
        raise BrokerError(f"embedded amqtt broker did not start on {host}:{port}: {errors[:1]}")
    log.info("embedded amqtt broker listening on %s:%d", host, port)
    return BrokerHandle(host, port, "amqtt", None, stop)
