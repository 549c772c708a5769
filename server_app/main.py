"""`fedpeft-server`: runs one federated job over MQTT, or resumes a killed one from its run directory."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from typing import Any

from fedpeft_edge.errors import FedPeftError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedpeft-server", description=__doc__)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", action="append", metavar="CONFIG.yaml",
                     help="the run's YAML config; repeat to overlay files (--config base.yaml --config "
                     "server.yaml: later files win, key by key)")
    src.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last completed round")
    p.add_argument("--broker", default=None, metavar="HOST:PORT", help="MQTT broker (overrides comm_args)")
    p.add_argument("--log-level", default=None, choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.add_argument("--dashboard", metavar="[HOST:]PORT", help="serve the live dashboard (host default 127.0.0.1; "
                   "any other host requires a token)")
    p.add_argument("--dashboard-token-file", metavar="FILE", help="a file whose first line is the token the dashboard "
                   "requires (or set $FEDPEFT_DASHBOARD_TOKEN; default: none on 127.0.0.1, a random one printed "
                   "with the URL otherwise); never a token on the command line")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from fedpeft_edge.config import broker_overrides, replace_in
    from fedpeft_edge.server.app import ServerApp, load_server_config

    try:
        cfg, run_dir = load_server_config(args.config, args.resume)
        if args.broker:
            cfg = replace_in(cfg, **broker_overrides(args.broker))
        logging.basicConfig(level=args.log_level or cfg.tracking_args.log_level,
                            format="%(asctime)s %(levelname)s [server] %(name)s: %(message)s")
        app = ServerApp(cfg, run_dir, resume=bool(args.resume))
        dashboard = _observe(app, cfg, run_dir, args)
    except FedPeftError as exc:
        print(f"fedpeft-server: error: {exc}", file=sys.stderr)
        return 2

    def stop(_signum: int, _frame: Any) -> None:
        logging.getLogger(__name__).warning("SIGTERM: stopping; resume with --resume %s", run_dir)
        app.finish()
        raise SystemExit(143)

    signal.signal(signal.SIGTERM, stop)
    try:
        app.run_until_done()
    except KeyboardInterrupt:
        app.finish()
        return 130
    finally:
        if dashboard is not None:
            dashboard.stop()
    return report_end(app.engine.end_reason, cfg.train_args.comm_round, app.engine.version, run_dir)


def report_end(end_reason: str | None, rounds: int, done: int, run_dir: Any) -> int:
    """Say how the run ended; 0 only when it completed its rounds (scripts and CI rely on it)."""
    if end_reason == "completed":
        print(f"fedpeft-server: run finished ({done} rounds); results in {run_dir}")
        return 0
    print(f"fedpeft-server: error: the run ended after {done} of {rounds} rounds: {end_reason or 'stopped'}; "
          f"records in {run_dir}", file=sys.stderr)
    return 1


class ConsoleRounds:
    """A run-log sink printing one line per join and per round on the server's console (as the demo does)."""

    def __init__(self, rounds: int) -> None:
        self.rounds = rounds

    def write(self, record: dict[str, Any]) -> None:
        from fedpeft_edge.rundir import describe_divergence, describe_round

        kind = record.get("kind")
        if kind == "round":
            print(f"fedpeft-server: {describe_round(record, self.rounds)}", flush=True)
        elif kind == "join":
            state = "joined" if record.get("accepted") else f"REFUSED ({record.get('reason')})"
            print(f"fedpeft-server: device {record.get('device_id')} {state}", flush=True)
        elif kind == "divergence":
            print(f"fedpeft-server: DIVERGENCE {describe_divergence(record)}", flush=True)

    def close(self) -> None:
        return None


def _observe(app: Any, cfg: Any, run_dir: Any, args: argparse.Namespace) -> Any:
    """Attach the console's round lines and the trackers the config enables and, with --dashboard, start the
    live dashboard."""
    from fedpeft_edge.tracking import attach_trackers

    app.engine.runlog.add_sink(ConsoleRounds(cfg.train_args.comm_round))
    attach_trackers(app.engine.runlog, cfg, run_dir)
    if not args.dashboard:
        return None
    from fedpeft_edge.dashboard.server import read_token, run_info, serve_live

    dashboard = serve_live(app.engine.runlog, cfg.common_args.run_id, run_info(cfg), args.dashboard,
                           read_token(args.dashboard_token_file))
    print(f"fedpeft-server: dashboard at {dashboard.url}", flush=True)
    return dashboard


if __name__ == "__main__":
    sys.exit(main())
