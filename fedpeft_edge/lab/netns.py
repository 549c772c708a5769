"""The lab's network: namespaces, veth pairs, a bridge and tc rate shaping; built per run, always torn down.

Nothing is created in the caller's namespace. A hub namespace holds the bridge; the server namespace (broker
and server) and one namespace per device each join it by a veth pair made inside the hub. Each device's veth
is shaped with tbf at both ends: the device end's egress is its uplink, the hub end's egress its downlink.
Every name carries the prefix `fpl-<tag>-` (interfaces `fpl<tag>...`, at most 15 characters), and a state file
records the owning process, so a later run (or `fedpeft-edge lab --cleanup`) removes what a killed run left.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path

from fedpeft_edge.config import LinkProfile
from fedpeft_edge.errors import LabError

log = logging.getLogger(__name__)

PREFIX = "fpl-"
STATE_DIR = Path("/run/fedpeft-lab")
SUBNET = "10.77"
SERVER_IP = f"{SUBNET}.0.1"
CAP_NET_ADMIN = 12
FRAME_BYTES = 1514
TBF_LIMIT_BYTES = 512 * 1024  # deeper than what the relay's sockets let TCP keep in flight: tbf never drops


def missing_privileges(cap_eff: int | None = None) -> str | None:
    """Why this process cannot build the lab (None if it can): CAP_NET_ADMIN, CAP_SYS_ADMIN and `ip`/`tc`.

    `cap_eff` is the effective capability mask; None reads this process's from /proc/self/status.
    """
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"the `{tool}` program is missing: install iproute2 (apt-get install iproute2)"
    if cap_eff is None:
        try:
            status = Path("/proc/self/status").read_text()
            cap_eff = int(next(line.split()[1] for line in status.splitlines() if line.startswith("CapEff:")), 16)
        except (OSError, StopIteration, ValueError):
            return "cannot read this process's capabilities from /proc/self/status"
    needed = {"CAP_NET_ADMIN": CAP_NET_ADMIN, "CAP_SYS_ADMIN": 21}  # SYS_ADMIN: `ip netns` mounts
    lacking = [name for name, bit in needed.items() if not cap_eff >> bit & 1]
    if lacking:
        return (f"this process lacks {' and '.join(lacking)} (network namespaces, veth and tc need them): run as "
                "root (sudo fedpeft-edge lab ...) or in a container started with --cap-add NET_ADMIN "
                "--cap-add SYS_ADMIN")
    return None


def require_privileges() -> None:
    """Raise LabError naming what is missing and the fix."""
    why = missing_privileges()
    if why:
        raise LabError(f"the network lab cannot run: {why}")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise LabError(f"`ip {' '.join(args)}` failed: {proc.stderr.strip()}")
    return proc


def _in_ns(ns: str, *cmd: str) -> None:
    proc = subprocess.run(["ip", "netns", "exec", ns, *cmd], capture_output=True, text=True)
    if proc.returncode != 0:
        raise LabError(f"`{' '.join(cmd)}` in namespace {ns} failed: {proc.stderr.strip()}")


def tbf_args(rate_mbit: float, burst_kb: float | None) -> list[str]:
    """tc tbf arguments for a rate: the bucket holds 4 ms of the rate, at least 4 full frames, unless given."""
    rate_bps = rate_mbit * 1e6
    burst = int(burst_kb * 1024) if burst_kb else max(int(rate_bps / 8 * 0.004), 4 * FRAME_BYTES)
    return ["tbf", "rate", f"{int(rate_bps)}bit", "burst", str(burst), "limit", str(TBF_LIMIT_BYTES)]


@dataclasses.dataclass(frozen=True)
class DeviceNet:
    """One device's namespace and its address on the lab's bridge."""

    device_id: str
    namespace: str
    address: str
    hub_if: str
    dev_if: str
    profile: LinkProfile


@dataclasses.dataclass
class Topology:
    """The namespaces of one lab run; `build()` creates them, `teardown()` removes every one."""

    tag: str
    devices: dict[str, DeviceNet]
    state_dir: Path = STATE_DIR

    @classmethod
    def plan(cls, links: Mapping[str, LinkProfile], state_dir: Path = STATE_DIR) -> Topology:
        tag = secrets.token_hex(2)
        devs = {}
        for i, (device_id, prof) in enumerate(links.items()):
            devs[device_id] = DeviceNet(device_id, f"{PREFIX}{tag}-{device_id}",
                                        f"{SUBNET}.{1 + i // 200}.{1 + i % 200}", f"fpl{tag}h{i}", f"fpl{tag}n{i}",
                                        prof)
        return cls(tag, devs, state_dir)

    @property
    def hub(self) -> str:
        return f"{PREFIX}{self.tag}-hub"

    @property
    def server_ns(self) -> str:
        return f"{PREFIX}{self.tag}-srv"

    def namespaces(self) -> list[str]:
        return [self.hub, self.server_ns, *(d.namespace for d in self.devices.values())]

    def build(self) -> None:
        """Create the state file first (so a crash mid-way is cleaned up), then hub, server and devices."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        (self.state_dir / f"{self.tag}.json").write_text(json.dumps({"pid": os.getpid(), "started": time.time(),
                                                                     "namespaces": self.namespaces()}))
        for ns in self.namespaces():
            _ip("netns", "add", ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        br = f"fpl{self.tag}br"
        _ip("-n", self.hub, "link", "add", br, "type", "bridge")
        _ip("-n", self.hub, "link", "set", br, "up")
        self._attach(self.server_ns, f"fpl{self.tag}hs", f"fpl{self.tag}ns", SERVER_IP, br)
        for d in self.devices.values():
            self._attach(d.namespace, d.hub_if, d.dev_if, d.address, br)
            self._shape(d)
        log.info("lab %s: %d device namespaces on bridge %s in %s", self.tag, len(self.devices), br, self.hub)

    def _attach(self, ns: str, hub_if: str, ns_if: str, address: str, bridge: str) -> None:
        _ip("-n", self.hub, "link", "add", hub_if, "type", "veth", "peer", "name", ns_if, "netns", ns)
        _ip("-n", self.hub, "link", "set", hub_if, "master", bridge, "up")
        _ip("-n", ns, "addr", "add", f"{address}/16", "dev", ns_if)
        _ip("-n", ns, "link", "set", ns_if, "up")

    def _shape(self, d: DeviceNet) -> None:
        p = d.profile
        if p.up_mbit:
            _in_ns(d.namespace, "tc", "qdisc", "add", "dev", d.dev_if, "root", *tbf_args(p.up_mbit, p.burst_kb))
        if p.down_mbit:
            _in_ns(self.hub, "tc", "qdisc", "add", "dev", d.hub_if, "root", *tbf_args(p.down_mbit, p.burst_kb))

    def teardown(self) -> None:
        """Kill what runs in our namespaces, delete them (their veths, bridge and qdiscs go with them)."""
        for ns in reversed(self.namespaces()):
            remove_namespace(ns)
        with contextlib.suppress(FileNotFoundError):
            (self.state_dir / f"{self.tag}.json").unlink()


def remove_namespace(ns: str) -> None:
    """SIGKILL every process left in namespace `ns`, then delete it (a no-op if it does not exist)."""
    deadline = time.monotonic() + 5.0
    while (pids := _ip("netns", "pids", ns, check=False).stdout.split()) and time.monotonic() < deadline:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        time.sleep(0.05)  # the namespace lives on while a process in it does
    _ip("netns", "delete", ns, check=False)


def our_namespaces() -> list[str]:
    """Every namespace with the lab's prefix, whoever made it."""
    out = _ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(PREFIX)]


def cleanup_stale(state_dir: Path = STATE_DIR) -> list[str]:
    """Remove the namespaces of lab runs whose owner process is gone (or that have no state file)."""
    live: set[str] = set()
    for state in state_dir.glob("*.json") if state_dir.is_dir() else []:
        try:
            info = json.loads(state.read_text())
            os.kill(int(info["pid"]), 0)
        except PermissionError:
            live.add(state.stem)  # alive, someone else's
        except (ProcessLookupError, ValueError, KeyError, OSError):
            state.unlink(missing_ok=True)
        else:
            live.add(state.stem)
    removed = []
    for ns in our_namespaces():
        tag = ns[len(PREFIX):].split("-", 1)[0]
        if tag not in live:
            remove_namespace(ns)
            removed.append(ns)
    if removed:
        log.warning("removed %d namespace(s) a killed lab run left: %s", len(removed), ", ".join(removed))
    return removed
