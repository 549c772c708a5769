"""Dashboard benchmark: what the live dashboard, with one client attached, costs the server over a real run.

A broker, `fedpeft-server --dashboard` and agent processes run for real on loopback; one client loads the page
(index, scripts, styles) and follows the event stream to the end, as a browser does. Figures:
  - the dashboard's own CPU inside the server (start-up incl. importing the web stack, the uvicorn thread,
    folding records on the sink thread; measured with thread CPU clocks and logged by the server) over the
    server process's whole CPU time (rusage from wait4): target <= 1%;
  - with --ab, the same run without --dashboard, and the difference of the two servers' CPU (noisy on a
    shared machine: shown for context, the target is judged on the direct figure).

    python benchmarks/bench_dashboard.py [--agents 4] [--rounds 5] [--tiny] [--ab]
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from run_configs import tiny_vit_run  # noqa: E402 (benchmarks/ is on sys.path as the script's folder)

TARGET_PCT = 1.0
def _demo_config(path: Path, port: int, agents: int, rounds: int) -> Path:
    """The demo's run (configs/quickstart.yaml: EfficientNet-Lite0, digits at 64 px), on our broker."""
    cfg = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text())
    cfg["common_args"]["run_id"] = "bench-dashboard"
    cfg["comm_args"].update(broker_host="127.0.0.1", broker_port=port)
    cfg["train_args"].update(client_num_in_total=agents, client_num_per_round=agents, min_devices=agents,
                             min_updates=max(1, agents // 2), comm_round=rounds)
    cfg["tracking_args"].update(run_dir=str(path.parent / "runs"), log_level="INFO")
    path.write_text(yaml.safe_dump(cfg))
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Client:
    """Loads the page like a browser, then reads the event stream until the server closes it."""

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self.frames = 0
        self.page_bytes = 0
        self.error: str | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            url = self._wait_url()
            for path in ("", "static/dashboard.js", "static/dashboard.css", "static/uplot/uPlot.iife.min.js",
                         "static/uplot/uPlot.min.css", "api/runs"):
                with urllib.request.urlopen(url + path, timeout=30) as r:
                    self.page_bytes += len(r.read())
            with urllib.request.urlopen(url + "api/events/0", timeout=600) as stream:
                for line in stream:
                    if line.startswith(b"event:"):
                        self.frames += 1
        except Exception as exc:  # reported with the figures
            self.error = f"{type(exc).__name__}: {exc}"

    def _wait_url(self) -> str:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
            m = re.search(r"dashboard at (http://\S+)", text)
            if m:
                return m.group(1)
            time.sleep(0.1)
        raise TimeoutError("the server never printed its dashboard URL")


def federated_run(agents: int, rounds: int, dashboard: bool, tiny: bool) -> dict[str, Any]:
    from fedpeft_edge.transport.broker import start_broker

    work = Path(tempfile.mkdtemp(prefix="bench-dashboard-"))
    broker = start_broker()
    if tiny:
        cfg = tiny_vit_run(work / "run.yaml", "bench-dashboard", broker.port, agents, rounds,
                           data_args={"max_train_samples": 800, "max_test_samples": 200},
                           tracking_args={"log_level": "INFO"})
    else:
        cfg = _demo_config(work / "run.yaml", broker.port, agents, rounds)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    server_log = work / "server.log"
    cmd = [sys.executable, "-m", "server_app.main", "--config", str(cfg)]
    if dashboard:
        cmd += ["--dashboard", f"127.0.0.1:{_free_port()}"]
    with server_log.open("wb") as log:
        server = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    client = Client(server_log) if dashboard else None
    agents_p = []
    for i in range(agents):
        with (work / f"dev{i}.log").open("wb") as log:
            agents_p.append(subprocess.Popen(
                [sys.executable, "-m", "device_agents.main", "--config", str(cfg), "--device-id", f"dev{i}",
                 "--client-index", str(i)], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
    try:
        _pid, status, usage = os.wait4(server.pid, 0)
        server.returncode = os.waitstatus_to_exitcode(status)
    finally:
        for p in agents_p:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
        broker.stop()
    text = server_log.read_text(errors="replace")
    if server.returncode != 0:
        raise SystemExit(f"server exited {server.returncode}; see {server_log}\n{text[-3000:]}")
    out: dict[str, Any] = {"server_cpu_s": usage.ru_utime + usage.ru_stime, "log": server_log}
    m = re.search(r"dashboard CPU ([\d.]+) s \(start-up ([\d.]+), web thread ([\d.]+), folding records ([\d.]+)\)",
                  text)
    if dashboard:
        if m is None:
            raise SystemExit(f"the server logged no dashboard CPU figure; see {server_log}")
        out.update(dash_cpu_s=float(m.group(1)), startup_s=float(m.group(2)), web_s=float(m.group(3)),
                   records_s=float(m.group(4)))
        if client is not None:
            client.thread.join(timeout=30)
            out.update(frames=client.frames, page_bytes=client.page_bytes, client_error=client.error)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--agents", type=int, default=4, help="agent processes (default: the demo's 4)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds (default: the demo's 5)")
    ap.add_argument("--tiny", action="store_true", help="a tiny random ViT instead of the demo's model (a short "
                    "run: the dashboard's fixed start-up cost weighs more)")
    ap.add_argument("--ab", action="store_true", help="also run without the dashboard and compare server CPU")
    args = ap.parse_args()
    with_d = federated_run(args.agents, args.rounds, dashboard=True, tiny=args.tiny)
    share = 100 * with_d["dash_cpu_s"] / with_d["server_cpu_s"]
    print(f"run: {'tiny ViT' if args.tiny else 'the demo (quickstart.yaml)'}, {args.agents} agents, {args.rounds} "
          "rounds, one client attached "
          f"({with_d['frames']} events received, page {with_d['page_bytes'] / 1e3:.0f} kB"
          + (f", client error: {with_d['client_error']}" if with_d["client_error"] else "") + ")")
    print(f"server CPU over the run          {with_d['server_cpu_s']:8.2f} s")
    print(f"dashboard CPU in the server      {with_d['dash_cpu_s']:8.3f} s  (start-up {with_d['startup_s']:.3f}, "
          f"web thread {with_d['web_s']:.3f}, folding records {with_d['records_s']:.3f})")
    verdict = "met" if share <= TARGET_PCT else "MISSED"
    print(f"dashboard share of server CPU    {share:8.2f} %   target <= {TARGET_PCT:.0f} %: {verdict}")
    if args.ab:
        without = federated_run(args.agents, args.rounds, dashboard=False, tiny=args.tiny)
        diff = with_d["server_cpu_s"] - without["server_cpu_s"]
        print(f"A/B: server CPU without dashboard {without['server_cpu_s']:7.2f} s; difference {diff:+.2f} s "
              f"({100 * diff / without['server_cpu_s']:+.1f} %; one pair of runs on a shared machine: noisy)")


if __name__ == "__main__":
    main()
