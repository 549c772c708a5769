"""`fedpeft-agent`: the program on an edge device. Loads the backbone once, joins the run, serves rounds.

`fedpeft-agent doctor --config X.yaml` checks the device first (device_agents/doctor.py)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from typing import Any

from fedpeft_edge.config import broker_overrides
from fedpeft_edge.errors import FedPeftError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedpeft-agent", description=__doc__)
    p.add_argument("--config", required=True, help="the run's YAML config (same as the server's)")
    p.add_argument("--device-id", required=True, help="this device's id (letters, digits, '-', '_')")
    p.add_argument("--client-index", type=int, default=None,
                   help="which partition shard of the shared data set to use (experiments); "
                        "omit to train on the device's own data (--data-dir)")
    p.add_argument("--data-dir", default=None, help="data directory (overrides data_args.data_cache_dir)")
    p.add_argument("--dataset", default=None, help="data set kind (overrides data_args.dataset)")
    p.add_argument("--broker", default=None, metavar="HOST:PORT", help="MQTT broker (overrides comm_args)")
    p.add_argument("--eval-backend", choices=["torch", "onnxruntime"], default=None)
    p.add_argument("--state-dir", default=None, help="where the agent keeps its state (privacy ledger)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--log-level", default=None, choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


def overrides_from(args: argparse.Namespace) -> dict[str, Any]:
    """Dotted config overrides for the flags that were given."""
    out: dict[str, Any] = {}
    if args.data_dir:
        out["data_args.data_cache_dir"] = args.data_dir
    if args.dataset:
        out["data_args.dataset"] = args.dataset
    if args.broker:
        out.update(broker_overrides(args.broker))
    if args.eval_backend:
        out["device_args.eval_backend"] = args.eval_backend
    if args.state_dir:
        out["device_args.state_dir"] = args.state_dir
    if args.threads:
        out["device_args.num_threads"] = args.threads
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["doctor"]:  # `fedpeft-agent doctor ...`: check the device instead of joining
        from device_agents.doctor import main as doctor_main

        return doctor_main(argv[1:])
    args = build_parser().parse_args(argv)
    from fedpeft_edge.client.agent import AgentIdentity, DeviceAgent
    from fedpeft_edge.client.manager import DeviceManager
    from fedpeft_edge.config import load_config

    try:
        cfg = load_config(args.config, overrides_from(args))
        logging.basicConfig(level=args.log_level or cfg.tracking_args.log_level,
                            format=f"%(asctime)s %(levelname)s [{args.device_id}] %(name)s: %(message)s")
        agent = DeviceAgent(cfg, AgentIdentity(args.device_id, args.client_index))
        manager = DeviceManager(agent, cfg.comm_args, cfg.common_args.run_id,
                                resend_limit=cfg.train_args.resend_rate_per_round)
    except FedPeftError as exc:
        print(f"fedpeft-agent: error: {exc}", file=sys.stderr)
        return 2

    def stop(_signum: int, _frame: Any) -> None:
        logging.getLogger(__name__).info("SIGTERM: leaving the run")
        manager.finish()
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    try:
        manager.run()
    except KeyboardInterrupt:
        manager.finish()
        return 130
    finally:
        manager.com_manager.close()
    if manager.refusal:
        print(f"fedpeft-agent: refused by the server: {manager.refusal}", file=sys.stderr)
    return manager.exit_code


if __name__ == "__main__":
    sys.exit(main())
