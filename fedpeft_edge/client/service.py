"""A systemd unit that runs the device agent as a service: non-root, restarted on failure, state under
/var/lib, logs in the journal, and the hardening an agent tolerates (it reads sensors in /sys and needs the GPU
device nodes, so /dev and /sys stay visible read-only)."""

from __future__ import annotations

import dataclasses
import re
import shlex
from pathlib import Path

from fedpeft_edge.errors import ConfigError

#: The agent's exit codes that a restart cannot fix: 2 = bad config or flags, 3 = refused by the server.
NO_RESTART_EXIT_CODES = (2, 3)
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


@dataclasses.dataclass(frozen=True)
class ServiceSpec:
    """What the unit runs and as whom."""

    user: str
    config: Path  # the run's YAML on the device, absolute
    device_id: str
    python: Path  # the agent venv's interpreter, absolute
    group: str | None = None  # None: the user's primary group
    restart_sec: int = 10
    supplementary_groups: tuple[str, ...] = ("video",)  # Jetson GPU (/dev/nvhost-*, /dev/nvmap); render

    def __post_init__(self) -> None:
        if self.user in ("root", "0"):
            raise ConfigError("install-service --user root: the agent runs as a non-root user; create one "
                              "(sudo useradd --system --create-home fedpeft) and pass --user fedpeft")
        for what, value in (("--user", self.user), ("--device-id", self.device_id),
                            *(("--group", g) for g in [self.group] if g)):
            if not _NAME.match(value):
                raise ConfigError(f"{what} {value!r} is not a valid name (letters, digits, '_', '.', '-')")
        for what, path in (("--config", self.config), ("--python", self.python)):
            if not path.is_absolute():
                raise ConfigError(f"{what} {str(path)!r} must be an absolute path in a unit file")

    @property
    def unit_name(self) -> str:
        return f"fedpeft-agent-{self.device_id}.service"

    #: StateDirectory: the agent keeps each device's state (privacy ledger) in <state_dir>/<device id>/.
    state_dir: str = "/var/lib/fedpeft-agent"


def render_systemd_unit(spec: ServiceSpec) -> str:
    """The unit file's text; `systemd-analyze verify` accepts it."""
    cmd = [str(spec.python), "-m", "device_agents.main", "--config", str(spec.config),
           "--device-id", spec.device_id, "--state-dir", spec.state_dir]
    exec_start = " ".join(shlex.quote(c) for c in cmd)
    groups = " ".join(spec.supplementary_groups)
    return "\n".join([
        "[Unit]",
        f"Description=fedpeft-edge device agent {spec.device_id}",
        "Wants=network-online.target time-sync.target",
        "After=network-online.target time-sync.target",
        "StartLimitIntervalSec=600",
        "StartLimitBurst=10",
        "",
        "[Service]",
        "Type=simple",
        f"User={spec.user}",
        *( [f"Group={spec.group}"] if spec.group else []),
        *( [f"SupplementaryGroups={groups}"] if groups else []),
        f"ExecStart={exec_start}",
        f"WorkingDirectory={spec.state_dir}",
        # /var/lib/fedpeft-agent/<device id>/: the privacy ledger and other agent state, owned by the user.
        "StateDirectory=fedpeft-agent",
        "StateDirectoryMode=0750",
        "Environment=PYTHONUNBUFFERED=1",
        "StandardOutput=journal",
        "StandardError=journal",
        f"SyslogIdentifier=fedpeft-agent-{spec.device_id}",
        "Restart=on-failure",
        f"RestartSec={spec.restart_sec}",
        "RestartPreventExitStatus=" + " ".join(str(c) for c in NO_RESTART_EXIT_CODES),
        "KillSignal=SIGTERM",
        "TimeoutStopSec=30",
        # Hardening that keeps GPU device nodes and read-only /sys sensors (tegrastats, INA3221, RAPL, NVML).
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=read-only",
        "PrivateTmp=yes",
        "ProtectKernelModules=yes",
        "ProtectKernelLogs=yes",
        "ProtectControlGroups=yes",
        "ProtectClock=yes",
        "ProtectHostname=yes",
        "RestrictSUIDSGID=yes",
        "RestrictRealtime=yes",
        "RestrictNamespaces=yes",
        "LockPersonality=yes",
        "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX AF_NETLINK",
        "UMask=0027",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
        "",
    ])
