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
    p.add_argument("--config", required=True, action="append", metavar="CONFIG.yaml",
                   help="the run's YAML config (same as the server's); repeat to overlay a per-device file "
                   "(--config base.yaml --config node.yaml: later files win, key by key)")
    p.add_argument("--device-id", default=None, help="this device's id (letters, digits, '-', '_')")
    p.add_argument("--client-index", type=int, default=None,
                   help="which partition shard of the shared data set to use (experiments); "
                        "omit to train on the device's own data (--data-dir)")
    p.add_argument("--fleet", type=int, default=None, metavar="K",
                   help="host K logical devices on one shared backbone (shards --client-index-start..+K-1)")
    p.add_argument("--client-index-start", type=int, default=0, help="first partition shard of a --fleet")
    p.add_argument("--device-id-pattern", default="dev{index}",
                   help="device ids of a --fleet, formatted with the shard index (default dev{index})")
    p.add_argument("--train-workers", type=int, default=1,
                   help="devices of a --fleet that train at once (each on a model replica sharing the frozen "
                        "backbone; default 1)")
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


def identities_from(args: argparse.Namespace) -> list[Any]:
    """The devices this process hosts: one (--device-id) or a fleet (--fleet K)."""
    from fedpeft_edge.client.device import AgentIdentity
    from fedpeft_edge.client.fleet import fleet_identities
    from fedpeft_edge.errors import ConfigError

    if args.fleet is not None:
        if args.device_id or args.client_index is not None:
            raise ConfigError("--fleet K names its devices by --device-id-pattern and --client-index-start; "
                              "drop --device-id/--client-index")
        return fleet_identities(args.fleet, args.client_index_start, args.device_id_pattern)
    if not args.device_id:
        raise ConfigError("pass --device-id ID (or --fleet K to host several devices)")
    return [AgentIdentity(args.device_id, args.client_index)]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["doctor"]:  # `fedpeft-agent doctor ...`: check the device instead of joining
        from device_agents.doctor import main as doctor_main

        return doctor_main(argv[1:])
    args = build_parser().parse_args(argv)
    from fedpeft_edge.client.fleet import FleetHost
    from fedpeft_edge.config import load_config

    name = args.device_id or f"fleet-{args.client_index_start}"
    try:
        cfg = load_config(args.config, overrides_from(args))
        logging.basicConfig(level=args.log_level or cfg.tracking_args.log_level,
                            format=f"%(asctime)s %(levelname)s [{name}] %(threadName)s %(name)s: %(message)s")
        host = FleetHost(cfg, identities_from(args), train_workers=args.train_workers)
    except FedPeftError as exc:
        print(f"fedpeft-agent: error: {exc}", file=sys.stderr)
        return 2

    def stop(_signum: int, _frame: Any) -> None:
        logging.getLogger(__name__).info("SIGTERM: leaving the run")
        host.stop()
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    try:
        code = host.run()
    except KeyboardInterrupt:
        host.stop()
        return 130
    finally:
        host.close()
    for m in host.managers:
        if m.refusal:
            print(f"fedpeft-agent: {m.logic.device_id} refused by the server: {m.refusal}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
