"""Local RabbitMQ nodes with the MQTT plugin (MQTT 3.1.1), alone or as a cluster, for tests and demos.

Every node lives in its own temp directory: its own Mnesia and log dirs, node name, AMQP, MQTT and Erlang
distribution ports, enabled_plugins file, config, and an Erlang cookie under a private HOME; the nodes of
one cluster share a private epmd (ERL_EPMD_PORT on loopback). The system's RabbitMQ, its cookie and the
default epmd on 4369 are never touched.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from fedpeft_edge.errors import BrokerError

log = logging.getLogger(__name__)

_RABBIT_BIN = Path("/usr/lib/rabbitmq/bin")  # Debian's unwrapped scripts (/usr/sbin ones su to `rabbitmq`)
_CTL_PORTS = 10  # rabbitmqctl's own distribution ports above the node's


def find_rabbitmq() -> Path | None:
    """Directory holding rabbitmq-server and rabbitmqctl, or None if RabbitMQ is not installed."""
    for d in (_RABBIT_BIN, *(Path(p).parent for p in filter(None, [shutil.which("rabbitmq-server")]))):
        if (d / "rabbitmq-server").exists() and (d / "rabbitmqctl").exists():
            return d
    return None


def nofile_limit() -> int:
    """The file-descriptor limit a broker child gets: the hard limit (capped at 2**20), for 1000s of clients."""
    import resource

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return 1 << 20 if hard == resource.RLIM_INFINITY else min(int(hard), 1 << 20)


def with_nofile(argv: list[str]) -> list[str]:
    """argv run under `sh` with RLIMIT_NOFILE raised to nofile_limit() (no preexec_fn: safe with threads)."""
    return ["sh", "-c", 'ulimit -n "$0" && exec "$@"', str(nofile_limit()), *argv]


def _wait_accepting(host: str, port: int, timeout_s: float, alive: Any) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not alive():
            return False
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.2)
    return False


def _free_block(host: str, count: int) -> int:
    """First port of `count` consecutive free ports below 32768 (distribution ports + 10 stay valid)."""
    for _ in range(200):
        base = 20000 + secrets.randbelow(12000)
        socks: list[socket.socket] = []
        try:
            for p in range(base, base + count):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                socks.append(s)
                s.bind((host, p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise BrokerError(f"found no {count} consecutive free ports on {host} for RabbitMQ; free some ports")


@dataclasses.dataclass
class RabbitNode:
    """One running RabbitMQ node: MQTT clients connect to `host:port`."""

    name: str  # Erlang node name, e.g. fpmqtt21883@localhost
    host: str
    port: int  # MQTT
    amqp_port: int
    dist_port: int
    epmd_port: int
    workdir: Path
    proc: subprocess.Popen[bytes] = dataclasses.field(repr=False)
    bin_dir: Path = dataclasses.field(repr=False)

    @property
    def env(self) -> dict[str, str]:
        w = self.workdir
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        env.update({
            "HOME": str(w), "RABBITMQ_NODENAME": self.name, "RABBITMQ_NODE_IP_ADDRESS": self.host,
            "RABBITMQ_NODE_PORT": str(self.amqp_port), "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_CTL_DIST_PORT_MIN": str(self.dist_port + 1),
            "RABBITMQ_CTL_DIST_PORT_MAX": str(self.dist_port + _CTL_PORTS),
            "ERL_EPMD_PORT": str(self.epmd_port), "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_MNESIA_BASE": str(w / "mnesia"), "RABBITMQ_LOG_BASE": str(w / "log"),
            "RABBITMQ_CONFIG_FILE": str(w / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(w / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(w / "enabled_plugins"),
            "RABBITMQ_CONF_ENV_FILE": str(w / "rabbitmq-env.conf"), "RABBITMQ_PID_FILE": str(w / "rabbit.pid"),
        })
        return env

    def ctl(self, *args: str, timeout_s: float = 120.0) -> str:
        """Run `rabbitmqctl -n <this node> args...`; its stdout, or BrokerError with its output."""
        cmd = [str(self.bin_dir / "rabbitmqctl"), "-n", self.name, *args]
        try:
            done = subprocess.run(cmd, env=self.env, capture_output=True, timeout=timeout_s, check=False)
        except subprocess.TimeoutExpired as exc:
            raise BrokerError(f"rabbitmqctl {' '.join(args)} on {self.name} took over {timeout_s:g} s") from exc
        if done.returncode != 0:
            raise BrokerError(f"rabbitmqctl {' '.join(args)} on {self.name} failed ({done.returncode}): "
                              f"{(done.stdout + done.stderr).decode(errors='replace')[-1500:]}")
        return done.stdout.decode(errors="replace")

    def log_tail(self, chars: int = 3000) -> str:
        path = self.workdir / "server.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def stop(self, timeout_s: float = 60.0) -> None:
        """Stop the node (SIGTERM: rabbitmq-server stops it cleanly), then SIGKILL its process group."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("RabbitMQ node %s ignored SIGTERM for %.0f s; killing it", self.name, timeout_s)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # the node's own group: beam, erl_child_setup, ...
        self.proc.wait(timeout=10)


def _rabbit_config(host: str, port: int, amqp_port: int) -> str:
    return "\n".join([
        f"listeners.tcp.default = {host}:{amqp_port}",
        f"mqtt.listeners.tcp.default = {host}:{port}",
        "mqtt.allow_anonymous = true",
        "loopback_users = none",
        # MQTT 3.10 keeps retained messages (our presence, last wills) only with a store configured. It is
        # node-local: a client on another cluster node does not see what was retained here.
        "mqtt.retained_message_store = rabbit_mqtt_retained_msg_store_ets",
        "disk_free_limit.absolute = 50MB",
        "log.file = false",
        "log.console = true",
        "log.console.level = warning",
    ]) + "\n"


def launch_rabbitmq_node(
    port: int | None = None,
    host: str = "127.0.0.1",
    cookie: str | None = None,
    epmd_port: int | None = None,
    workdir: Path | None = None,
) -> RabbitNode:
    """Start (do not wait for) a RabbitMQ node with the MQTT plugin; `wait_rabbitmq_node` waits for it."""
    bin_dir = find_rabbitmq()
    if bin_dir is None:
        raise BrokerError("RabbitMQ is not installed (apt-get install rabbitmq-server); or use mosquitto")
    port = port or _free_block(host, 1)
    base = _free_block(host, 2 + _CTL_PORTS)  # AMQP, distribution, rabbitmqctl's range
    epmd_port = epmd_port or _free_block(host, 1)
    w = workdir or Path(tempfile.mkdtemp(prefix=f"fedpeft-rabbitmq-{port}-"))
    w.mkdir(parents=True, exist_ok=True)
    (w / "rabbitmq.conf").write_text(_rabbit_config(host, port, base))
    (w / "enabled_plugins").write_text("[rabbitmq_mqtt].\n")
    (w / "rabbitmq-env.conf").write_text("")  # instead of /etc/rabbitmq/rabbitmq-env.conf
    cookie_file = w / ".erlang.cookie"
    cookie_file.write_text(cookie or secrets.token_hex(16))
    cookie_file.chmod(0o400)
    node = RabbitNode(f"fpmqtt{port}@localhost", host, port, base, base + 1, epmd_port, w,
                      proc=None, bin_dir=bin_dir)  # type: ignore[arg-type]
    logfile = (w / "server.log").open("wb")
    node.proc = subprocess.Popen(with_nofile([str(bin_dir / "rabbitmq-server")]), env=node.env, cwd=w,
                                 stdout=logfile, stderr=subprocess.STDOUT, start_new_session=True)
    logfile.close()
    return node


def wait_rabbitmq_node(node: RabbitNode, timeout_s: float = 120.0) -> None:
    """Block until the node accepts MQTT connections; BrokerError (with its log) if it does not."""
    if not _wait_accepting(node.host, node.port, timeout_s, alive=lambda: node.proc.poll() is None):
        text = node.log_tail()
        node.stop()
        raise BrokerError(f"RabbitMQ node {node.name} did not accept MQTT on {node.host}:{node.port} within "
                          f"{timeout_s:g} s; its log:\n{text}")
    log.info("RabbitMQ node %s (pid %d) serves MQTT 3.1.1 on %s:%d", node.name, node.proc.pid, node.host,
             node.port)


def stop_epmd(epmd_port: int) -> None:
    """Stop the private epmd our nodes started on `epmd_port` (never the system's default one)."""
    epmd = shutil.which("epmd")
    if epmd is None:
        return
    env = {**os.environ, "ERL_EPMD_PORT": str(epmd_port)}
    subprocess.run([epmd, "-kill"], env=env, capture_output=True, timeout=10, check=False)


@dataclasses.dataclass
class RabbitCluster:
    """Running RabbitMQ nodes joined in one cluster; `nodes[0]` is the one the others joined."""

    nodes: list[RabbitNode]
    epmd_port: int

    def stop(self) -> None:
        for node in reversed(self.nodes):
            node.stop()
        stop_epmd(self.epmd_port)
        for node in self.nodes:
            shutil.rmtree(node.workdir, ignore_errors=True)

    def __enter__(self) -> RabbitCluster:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()


def start_rabbitmq(port: int | None = None, host: str = "127.0.0.1", timeout_s: float = 120.0) -> RabbitCluster:
    """One RabbitMQ node with the MQTT plugin on host:port (a cluster of one; stop() removes its files)."""
    return start_rabbitmq_cluster(1, host, timeout_s, ports=[port] if port else None)


def start_rabbitmq_cluster(
    size: int = 2, host: str = "127.0.0.1", timeout_s: float = 120.0, ports: list[int] | None = None
) -> RabbitCluster:
    """`size` nodes started in parallel, nodes 2.. joined to node 1 (rabbitmqctl join_cluster)."""
    cookie, epmd_port = secrets.token_hex(16), _free_block(host, 1)
    ports = ports or [0] * size
    nodes: list[RabbitNode] = []
    cluster = RabbitCluster(nodes, epmd_port)
    try:
        for p in ports:
            nodes.append(launch_rabbitmq_node(p or None, host, cookie, epmd_port))
        for node in nodes:
            wait_rabbitmq_node(node, timeout_s)
        for node in nodes[1:]:
            _join(node, nodes[0], timeout_s)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _join(node: RabbitNode, first: RabbitNode, timeout_s: float) -> None:
    node.ctl("stop_app")
    node.ctl("join_cluster", first.name)
    node.ctl("start_app")
    node.ctl("await_startup", "--timeout", str(int(timeout_s)))
    if not _wait_accepting(node.host, node.port, timeout_s, alive=lambda: node.proc.poll() is None):
        raise BrokerError(f"RabbitMQ node {node.name} stopped serving MQTT after joining {first.name}:\n"
                          f"{node.log_tail()}")
    log.info("RabbitMQ node %s joined %s", node.name, first.name)


def describe(cluster: RabbitCluster) -> dict[str, Any]:
    """Nodes and their MQTT ports (for logs and the CLI)."""
    return {n.name: f"{n.host}:{n.port}" for n in cluster.nodes}
