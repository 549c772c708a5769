"""`fedpeft-edge demo`: a broker, the server and N agent processes on this machine, with live progress.

Every part is the real program: `fedpeft-server` and `fedpeft-agent` run as separate processes and talk
only through the MQTT broker; the demo just starts them, follows the run's metrics.jsonl and prints tables.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fedpeft_edge.config import PEFT_METHODS
from fedpeft_edge.records import DivergenceRecord, JoinRecord, Record, RoundRecord, parse_record

REPO_CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=str(REPO_CONFIGS / "quickstart.yaml"),
                        help="run config (default: configs/quickstart.yaml)")
    parser.add_argument("--method", choices=PEFT_METHODS,
                        help="PEFT method (default: the config's, bias)")
    parser.add_argument("--devices", type=int, help="number of agent processes (all take part every round)")
    parser.add_argument("--rounds", type=int, help="federated rounds")
    parser.add_argument("--dataset", choices=["digits", "fashion_mnist"], help="data set (default: digits)")
    parser.add_argument("--max-train-samples", type=int, help="cap the shared training pool (quick runs)")
    parser.add_argument("--encoding", choices=["fp32", "fp16", "bf16", "int8", "int8_row"])
    parser.add_argument("--run-id", help="run id (default: demo-<method>-<time>)")
    parser.add_argument("--run-dir", help="parent directory of run directories (default: the config's)")
    parser.add_argument("--port", type=int, default=0, help="broker port (default: a free one)")
    parser.add_argument("--lr", type=float, help="client learning rate")
    parser.add_argument("--no-report", action="store_true", help="skip report.html and plots")
    parser.add_argument("--timeout", type=float, default=900.0, help="give up after this many seconds")
    parser.add_argument("--dashboard", default="127.0.0.1:0", metavar="[HOST:]PORT",
                        help="where the server serves the live dashboard (default: a free port on 127.0.0.1; "
                        "another host gets a token)")
    parser.add_argument("--no-dashboard", action="store_true", help="do not serve the live dashboard")
    parser.add_argument("--keystore", metavar="DIR", default=None,
                        help="where the run's keys and broker passwords go, outside the run directory (default: a "
                        "fresh private temporary directory, deleted when the demo ends)")
    parser.add_argument("--insecure", action="store_true",
                        help="skip provisioning: anonymous broker, unsigned messages (default: provision the run)")


# Client learning rates that train the demo's pretrained CNN on digits (measured centrally, 1 epoch, 64 px,
# zero-initialised head): the paper's ViT rates are a decade lower for full and LoRA on this backbone.
DEMO_LR = {"full": 0.003, "head": 0.01, "bias": 0.01, "lora": 0.003, "adapter": 0.005, "prompt": 0.01}


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if args.method:
        out["peft_args.method"] = args.method
        out["train_args.learning_rate"] = DEMO_LR[args.method]
    if args.devices:
        for key in ("client_num_in_total", "client_num_per_round", "min_devices"):
            out[f"train_args.{key}"] = args.devices
        out["train_args.min_updates"] = max(1, args.devices // 2)
    if args.rounds:
        out["train_args.comm_round"] = args.rounds
    if args.dataset:
        out["data_args.dataset"] = args.dataset
        if args.dataset == "fashion_mnist" and not args.max_train_samples:
            out["data_args.max_train_samples"] = 4000
            out["data_args.max_test_samples"] = 1000
    if args.max_train_samples:
        out["data_args.max_train_samples"] = args.max_train_samples
    if args.encoding:
        out["comm_args.encoding"] = args.encoding
    if args.run_dir:
        out["tracking_args.run_dir"] = args.run_dir
    if args.lr:
        out["train_args.learning_rate"] = args.lr
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(args: argparse.Namespace) -> int:
    from fedpeft_edge.config import load_config
    from fedpeft_edge.rundir import refuse_reuse
    from fedpeft_edge.transport.broker import start_broker

    overrides = _overrides(args)
    base = load_config(args.config, overrides)
    method = base.peft_args.method
    run_id = args.run_id or f"demo-{method}-{time.strftime('%Y%m%d-%H%M%S')}"
    port = args.port or _free_port()
    overrides.update({"common_args.run_id": run_id, "comm_args.broker_port": port,
                      "comm_args.broker_host": "127.0.0.1"})
    cfg = load_config(args.config, overrides)
    run_dir = Path(cfg.tracking_args.run_dir) / run_id
    refuse_reuse(run_dir, run_id)  # before anything is written into it
    run_dir.mkdir(parents=True, exist_ok=True)
    n = cfg.train_args.client_num_in_total
    devices = [f"device-{i}" for i in range(n)]
    keystore = Path(args.keystore) if args.keystore else Path(tempfile.mkdtemp(prefix="fedpeft-keystore-"))
    prov = None if args.insecure else _provision(keystore, devices, run_id, cfg.comm_args.topic_prefix)
    configs = {node: _node_config(args.config, overrides, run_dir, node, prov) for node in ["0", *devices]}
    cfg_path = configs["0"]
    print(f"fedpeft-edge demo: {cfg.model_args.model} ({cfg.model_args.weights}), method {method}, "
          f"{n} devices, {cfg.train_args.comm_round} rounds, {cfg.data_args.dataset}; run dir {run_dir}")
    t0 = time.monotonic()
    broker = start_broker(port=port, secure_dir=None if prov is None else prov.root)
    security = ("anonymous, unsigned" if prov is None else
                f"ACL + passwords + Ed25519 signatures + end-to-end encryption (keystore {prov.root})")
    print(f"broker: {broker.kind} on 127.0.0.1:{broker.port}, {security}")
    procs: list[subprocess.Popen[bytes]] = []
    logs = run_dir / "logs"
    logs.mkdir(exist_ok=True)
    try:
        server_cmd = [sys.executable, "-m", "server_app.main", "--config", str(cfg_path)]
        server_env: dict[str, str] = {}
        if not args.no_dashboard:
            dash_args, url, server_env = _dashboard_args(args.dashboard)
            server_cmd += dash_args
            print(f"dashboard: {url}  (while the run lasts; afterwards: fedpeft-edge dashboard {run_dir})")
        procs.append(_spawn(server_cmd, logs / "server.log", server_env))
        for i, dev in enumerate(devices):
            procs.append(_spawn([sys.executable, "-m", "device_agents.main", "--config", str(configs[dev]),
                                 "--device-id", dev, "--client-index", str(i)],
                                logs / f"{dev}.log"))
        rc = _follow(run_dir, procs[0], cfg.train_args.comm_round, args.timeout)
    finally:
        for p in procs:
            _stop(p)
        broker.stop()
        if not args.keystore:  # a demo's keys are never reused
            shutil.rmtree(keystore, ignore_errors=True)
    wall = time.monotonic() - t0
    if rc != 0:
        why = _end_reason(run_dir)
        print(f"demo: error: the run did not complete (server exit code {rc}{'; ' + why if why else ''}); "
              f"see {logs / 'server.log'}", file=sys.stderr)
        return rc
    _print_tables(run_dir, cfg, wall)
    if cfg.model_args.family == "causal_lm":
        _print_answers(cfg, run_dir)
    if not args.no_report:
        from fedpeft_edge.report import write_report

        files = write_report([run_dir])
        print(f"report: {files.html}")
    return 0


def _end_reason(run_dir: Path) -> str | None:
    """Why the server ended the run, from its summary.json (None when it wrote none)."""
    from fedpeft_edge.rundir import read_summary

    summary = read_summary(run_dir)
    return str(summary.end_reason) if summary is not None else None


def _dashboard_args(bind: str) -> tuple[list[str], str, dict[str, str]]:
    """The server's --dashboard flags, the URL to print and the server's environment: a free port when none is
    given, a token off-host (in the environment: a command line is visible to every user)."""
    import secrets

    from fedpeft_edge.config import is_loopback
    from fedpeft_edge.dashboard.server import parse_bind

    host, port = parse_bind(bind)
    port = port or _free_port()
    from fedpeft_edge.dashboard.server import TOKEN_ENV

    flags = ["--dashboard", f"{host}:{port}"]
    env: dict[str, str] = {}
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    url = f"http://{shown}:{port}/"
    if not is_loopback(host):
        token = secrets.token_urlsafe(18)
        env[TOKEN_ENV] = token
        url += f"?token={token}"
    return flags, url, env


def _provision(keystore: Path, devices: list[str], run_id: str, prefix: str) -> Any:
    """Fresh credentials, keys and ACL for this run only, in a keystore outside the run directory (a run
    directory is copied and shared; its configs name the keystore's files and hold no secret)."""
    from fedpeft_edge.transport.provision import provision

    return provision(keystore / run_id, devices, topic_prefix=prefix, run_id=run_id)


def _node_config(config: str, overrides: dict[str, Any], run_dir: Path, node: str, prov: Any) -> Path:
    """The run's config for one node (server "0" or a device): its own credentials and keys when provisioned."""
    from fedpeft_edge.config import dump_config, load_config

    mine = dict(overrides)
    if prov is not None:
        mine.update(prov.comm_overrides(node))
    path = run_dir / ("demo-config.yaml" if node == "0" else f"demo-config-{node}.yaml")
    dump_config(load_config(config, mine), path)  # names the keystore's files; holds no secret
    return path


def _spawn(cmd: list[str], log_path: Path, extra_env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    # 0600: a node's log names its broker client and its peers; only this user reads it
    log = os.fdopen(os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(extra_env or {})}
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)


def _stop(p: subprocess.Popen[bytes]) -> None:
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=5)


def _follow(run_dir: Path, server: subprocess.Popen[bytes], rounds: int, timeout: float) -> int:
    """Print joins and rounds as the server records them; return the server's exit code."""
    metrics = run_dir / "metrics.jsonl"
    seen = 0
    deadline = time.monotonic() + timeout
    cum = 0
    while True:
        lines = metrics.read_text(encoding="utf-8").splitlines() if metrics.exists() else []
        for line in lines[seen:]:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                break
            seen += 1
            cum = _progress(parse_record(rec), rounds, cum)
        code = server.poll()
        if code is not None:
            return code
        if time.monotonic() > deadline:
            print(f"demo: no finish after {timeout:.0f}s; stopping", file=sys.stderr)
            return 1
        time.sleep(0.3)


def _progress(rec: Record | None, rounds: int, cum: int) -> int:
    """Print one record the server wrote (a join, a round, a divergence); return the cumulative bytes so far."""
    if isinstance(rec, JoinRecord):
        state = "joined" if rec.accepted else f"REFUSED ({rec.reason})"
        print(f"  {rec.device_id} {state}")
    elif isinstance(rec, RoundRecord):
        from fedpeft_edge.rundir import describe_round

        cum = int(rec.cum_bytes or 0)
        print(f"  {describe_round(rec, rounds)}")
    elif isinstance(rec, DivergenceRecord):
        from fedpeft_edge.rundir import describe_divergence

        print(f"  DIVERGENCE {describe_divergence(rec)}")
    return cum


def _print_answers(cfg: Any, run_dir: Path) -> None:
    """A causal LM's held-out prompts continued by the base and the federated model (also in the report)."""
    from fedpeft_edge.errors import FedPeftError
    from fedpeft_edge.report.samples import answer_prompts

    try:
        rows = answer_prompts(cfg, run_dir)
    except FedPeftError as exc:
        print(f"no held-out prompts answered: {exc}", file=sys.stderr)
        return
    print()
    print("held-out prompts, continued greedily by the base model and the federated one:")
    for row in rows:
        base, fed = (v for k, v in row.items() if k not in ("category", "prompt"))
        print(f"  [{row['category']}] {row['prompt']!r}\n    base:      {base!r}\n    federated: {fed!r}")


def _print_tables(run_dir: Path, cfg: Any, wall: float) -> None:
    from fedpeft_edge.planning import measure_update
    from fedpeft_edge.rundir import read_records

    rounds = read_records(run_dir, RoundRecord)
    print()
    print(f"{'round':>5} {'top-1':>7} {'MB down':>9} {'MB up':>9} {'round s':>8} {'updates':>8}")
    for r in rounds:
        ev = r.eval or {}
        acc = f"{100 * ev['top1']:.1f}%" if ev.get("top1") is not None else "-"
        print(f"{r.round:>5} {acc:>7} {(r.bytes_down or 0) / 1e6:>9.3f} {(r.bytes_up or 0) / 1e6:>9.3f} "
              f"{r.round_s or 0:>8.1f} {r.accepted or 0:>8}")
    if not rounds:
        return
    per_round = sum((r.bytes_down or 0) + (r.bytes_up or 0) for r in rounds) / len(rounds)
    devices = sum(r.accepted or 0 for r in rounds) / len(rounds)
    full = measure_update(cfg.model_args, "full", cfg.comm_args)
    full_round = 2 * full.mqtt_bytes * devices
    print()
    print(f"bytes on the wire per round ({cfg.peft_args.method}, measured): {per_round / 1e6:.3f} MB")
    print(f"full fine-tuning, same model and devices (a full update encoded: {full.mqtt_bytes / 1e6:.2f} MB "
          f"each way per device): {full_round / 1e6:.2f} MB per round")
    if cfg.peft_args.method != "full":
        print(f"{cfg.peft_args.method} moves {100 * per_round / full_round:.2f}% of full's bytes "
              f"({full_round / per_round:.0f}x less)")
    print(f"demo wall time {wall:.1f}s")
