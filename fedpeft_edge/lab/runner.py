"""One lab run: the real broker, server and agent programs in their namespaces, relays on every device's link.

The programs are unchanged: `python -m server_app.main` and `python -m device_agents.main`, started with
`ip netns exec`. The runner follows the run's metrics.jsonl to learn when rounds open (for outages scheduled
"at round r") and stops when the server exits, the timeout passes, or on SIGTERM/SIGINT; the namespaces are
removed in every case.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType
from typing import IO, Any

from fedpeft_edge.config import LinkProfile, RunConfig
from fedpeft_edge.errors import ConfigError, LabError
from fedpeft_edge.lab.links import OutageSchedule, assign_links, load_profiles
from fedpeft_edge.lab.netns import SERVER_IP, Topology, cleanup_stale, require_privileges
from fedpeft_edge.records import JoinRecord, RoundOpenRecord, RoundRecord, parse_record
from fedpeft_edge.rundir import read_metrics

log = logging.getLogger(__name__)

BROKER_PORT = 1883
REPO = Path(__file__).resolve().parents[2]


@dataclasses.dataclass(frozen=True)
class LabResult:
    """What a lab run left: its run directory, each device's link and relay log, the server's exit code."""

    run_dir: Path
    work_dir: Path
    links: dict[str, LinkProfile]
    relay_logs: dict[str, Path]
    server_rc: int | None
    outages: list[dict[str, Any]]
    started_at: float

    @classmethod
    def load(cls, work_dir: Path) -> LabResult:
        """The result a lab run wrote to WORK_DIR/lab.json (to report on it again)."""
        path = work_dir / "lab.json"
        try:
            d = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise LabError(f"cannot read {path} ({exc}); pass the work directory of a finished lab run") from exc
        return cls(Path(d["run_dir"]), work_dir, {k: LinkProfile(**v) for k, v in d["links"].items()},
                   {k: Path(v) for k, v in d["relay_logs"].items()}, d["server_rc"], d["outages"], d["started_at"])

    def to_json(self) -> dict[str, Any]:
        return {"run_dir": str(self.run_dir), "links": {d: dataclasses.asdict(p) for d, p in self.links.items()},
                "relay_logs": {d: str(p) for d, p in self.relay_logs.items()}, "server_rc": self.server_rc,
                "outages": self.outages, "started_at": self.started_at}


def check_config(cfg: RunConfig) -> None:
    """The run's schedule must fit the lab's devices (one agent per namespace, client index = device number)."""
    n, t = cfg.lab_args.devices, cfg.train_args
    if t.client_num_in_total != n or t.min_devices > n:
        raise ConfigError(f"lab_args.devices is {n} but train_args.client_num_in_total is {t.client_num_in_total} "
                          f"and min_devices {t.min_devices}: set client_num_in_total to {n} and min_devices <= {n}")


class LabRun:
    """Builds the namespaces, starts broker, server, relays and agents, follows the run, tears all down."""

    def __init__(self, cfg: RunConfig, config_path: Path, work_dir: Path, links_override: str | None = None,
                 python: str = sys.executable) -> None:
        check_config(cfg)
        self.cfg = cfg
        self.config_path = config_path.resolve()
        self.work_dir = work_dir
        self.python = python
        profiles = load_profiles(cfg.lab_args, links_override)
        self.links = assign_links(cfg.lab_args, profiles)
        self.run_dir = Path(cfg.tracking_args.run_dir) / cfg.common_args.run_id
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._logs: list[IO[bytes]] = []
        self._stop = False
        self._following = False

    def run(self) -> LabResult:
        require_privileges()
        cleanup_stale()
        self.work_dir.mkdir(parents=True, exist_ok=True)
        topo = Topology.plan(self.links)
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        started = time.time()
        outages: list[dict[str, Any]] = []
        server_rc: int | None = None
        try:
            topo.build()
            self._start_broker(topo)
            self._start("server", topo.server_ns, "-m", "server_app.main", "--config", str(self.config_path),
                        "--broker", f"127.0.0.1:{BROKER_PORT}")
            for i, d in enumerate(topo.devices.values()):
                self._start_relay(d.device_id, d.namespace, d.profile, i)
                self._start(d.device_id, d.namespace, "-m", "device_agents.main", "--config", str(self.config_path),
                            "--device-id", d.device_id, "--client-index", str(i),
                            "--broker", f"127.0.0.1:{BROKER_PORT}")
            self._following = True
            server_rc = self._follow(started, outages)
        finally:
            self._following, self._stop = False, True  # a signal from here on changes nothing: we tear down
            self._stop_all()
            topo.teardown()
            for s, h in old.items():
                signal.signal(s, h)
        result = LabResult(self.run_dir, self.work_dir, self.links,
                           {d: self.work_dir / f"relay-{d}.jsonl" for d in self.links}, server_rc, outages, started)
        (self.work_dir / "lab.json").write_text(json.dumps(result.to_json(), indent=1))
        return result

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if self._stop:
            return
        log.warning("signal %d: stopping the lab and removing its namespaces", signum)
        self._stop = True
        if not self._following:  # still starting: abort what blocks; `finally` removes the namespaces
            raise LabError(f"stopped by signal {signum} while the lab was starting")

    # --- processes ----------------------------------------------------------------------------------------
    def _popen(self, name: str, cmd: list[str], stdin: int | None = None) -> subprocess.Popen[bytes]:
        out = (self.work_dir / f"{name}.log").open("ab")
        self._logs.append(out)
        # The caller's directory (relative run_dir and data paths mean what they mean to the user); this
        # checkout first on the path, so the programs are the ones beside this module.
        path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path,
               "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        proc = subprocess.Popen(cmd, stdout=out if stdin is None else subprocess.PIPE, stderr=out, stdin=stdin,
                                env=env, start_new_session=True)
        self._procs[name] = proc
        return proc

    def _start(self, name: str, ns: str, *args: str) -> subprocess.Popen[bytes]:
        return self._popen(name, ["ip", "netns", "exec", ns, self.python, *args])

    def _start_broker(self, topo: Topology) -> None:
        conf = self.work_dir / "mosquitto.conf"
        conf.write_text(f"listener {BROKER_PORT} 0.0.0.0\nallow_anonymous true\npersistence false\n"
                        "log_dest stderr\nlog_type error\nlog_type warning\nlog_type notice\nlog_type information\n"
                        "max_inflight_messages 0\nmax_queued_messages 10000\n")
        exe = "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else "mosquitto"
        proc = self._popen("broker", ["ip", "netns", "exec", topo.server_ns, exe, "-c", str(conf)])
        self._wait_log("broker", "running", proc, 10.0)

    def _start_relay(self, device_id: str, ns: str, profile: LinkProfile, index: int) -> None:
        cmd = ["ip", "netns", "exec", ns, self.python, "-m", "fedpeft_edge.lab.relay",
               "--profile", json.dumps(dataclasses.asdict(profile)), "--listen", f"127.0.0.1:{BROKER_PORT}",
               "--upstream", f"{SERVER_IP}:{BROKER_PORT}", "--log", str(self.work_dir / f"relay-{device_id}.jsonl"),
               "--seed", str(self.cfg.lab_args.seed * 1000 + index)]
        proc = self._popen(f"relay-{device_id}", cmd, stdin=subprocess.PIPE)
        line = proc.stdout.readline() if proc.stdout is not None else b""
        if b"ready" not in line:
            raise LabError(f"the relay of {device_id} did not start (see {self.work_dir}/relay-{device_id}.log)")

    def _wait_log(self, name: str, text: str, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
        path = self.work_dir / f"{name}.log"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if text in path.read_text(errors="replace"):
                return
            if proc.poll() is not None:
                break
            time.sleep(0.05)
        raise LabError(f"{name} did not start within {timeout_s:.0f}s; its log {path}:\n"
                       f"{path.read_text(errors='replace')[-2000:]}")

    def cut(self, device_id: str, seconds: float) -> None:
        """Take a device's link down now for `seconds` (its relay freezes both directions)."""
        proc = self._procs[f"relay-{device_id}"]
        if proc.stdin is not None and proc.poll() is None:
            proc.stdin.write(f"cut {seconds}\n".encode())
            proc.stdin.flush()

    def _follow(self, started: float, outages: list[dict[str, Any]]) -> int | None:
        schedule = OutageSchedule.of(self.cfg.lab_args)
        deadline = time.monotonic() + self.cfg.lab_args.timeout_s
        server = self._procs["server"]
        while not self._stop:
            rc = server.poll()
            if rc is not None:
                return rc
            if time.monotonic() > deadline:
                raise LabError(f"the lab run did not finish within lab_args.timeout_s={self.cfg.lab_args.timeout_s}"
                               f" s; logs in {self.work_dir}")
            for name, proc in self._procs.items():
                if name.startswith("relay-") and proc.poll() is not None:
                    raise LabError(f"{name} exited with {proc.returncode}; see {self.work_dir}/{name}.log")
            if schedule.pending:
                for o in schedule.due(time.time(), started, round_open_times(self.run_dir)):
                    log.info("outage: %s loses its link for %.1f s", o.device, o.duration_s)
                    self.cut(o.device, o.duration_s)
                    outages.append({**dataclasses.asdict(o), "started": time.time()})
            time.sleep(0.1)
        return None

    def _stop_all(self) -> None:
        for proc in self._procs.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in self._procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
        for fh in self._logs:
            fh.close()


def round_open_times(run_dir: Path) -> dict[int, float]:
    """When each round first opened: `round_open` records where the server writes them; else round 1 at the
    last join before it and round r at the close of the aggregated round r-1."""
    if not (run_dir / "metrics.jsonl").exists():
        return {}
    recs = [rec for r in read_metrics(run_dir) if (rec := parse_record(r)) is not None]
    opened: dict[int, float] = {}
    for o in recs:
        if isinstance(o, RoundOpenRecord) and isinstance(o.round, int) and (o.opened_at or o.time) is not None:
            opened.setdefault(o.round, float(o.opened_at or o.time or 0.0))
    if opened:
        return opened
    joins = [j.time for j in recs if isinstance(j, JoinRecord) and j.accepted and j.time is not None]
    rounds = [r for r in recs if isinstance(r, RoundRecord) and isinstance(r.round, int) and r.time is not None]
    first = rounds[0] if rounds else None
    if first is not None and first.time is not None:
        opened[1] = first.time - (first.round_s or 0.0)
    elif joins:
        opened[1] = max(joins)  # round 1 is open once enough devices joined (approximate until it closes)
    for r in rounds:
        if r.aggregated and r.round is not None and r.time is not None:
            opened.setdefault(r.round + 1, float(r.time))
    return opened
