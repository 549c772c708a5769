"""`fedpeft-edge simulate`: the server and N devices in one process on one shared backbone, no broker."""

from __future__ import annotations

import argparse
import json
import sys
import time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, action="append", metavar="CONFIG.yaml",
                        help="the run's YAML config (the same a real run uses); repeat to overlay files "
                        "(later files win, key by key)")
    parser.add_argument("--devices", type=int, default=None,
                        help="devices in total (default: train_args.client_num_in_total)")
    parser.add_argument("--rounds", type=int, default=None, help="federated rounds (train_args.comm_round)")
    parser.add_argument("--run-id", default=None, help="run id (default: the config's common_args.run_id)")
    parser.add_argument("--resume", action="store_true", help="continue the run directory's last checkpoint")


def run(args: argparse.Namespace) -> int:
    from fedpeft_edge.config import load_config
    from fedpeft_edge.simulation import Simulation, simulation_config

    overrides: dict[str, object] = {}
    if args.rounds:
        overrides["train_args.comm_round"] = args.rounds
    if args.run_id:
        overrides["common_args.run_id"] = args.run_id
    cfg = simulation_config(load_config(args.config, overrides), args.devices)
    t0 = time.perf_counter()
    sim = Simulation(cfg, resume=args.resume)
    run_dir = sim.run()
    summary = json.loads((run_dir / "summary.json").read_text())
    print(f"simulated {cfg.train_args.client_num_in_total} devices, {summary['rounds']} rounds in "
          f"{time.perf_counter() - t0:.1f} s; final top-1 {summary.get('final_top1')}; "
          + (f"final perplexity {summary['final_perplexity']:.3f}; " if "final_perplexity" in summary else "")
          + f"{summary['bytes_total']} encoded bytes; results in {run_dir}")
    reason = summary.get("end_reason")
    if reason != "completed":
        print(f"fedpeft-edge simulate: error: the run ended after {summary['rounds']} of "
              f"{cfg.train_args.comm_round} rounds: {reason}", file=sys.stderr)
        return 1
    return 0
