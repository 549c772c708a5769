"""`fedpeft-agent doctor`: check this device before it joins a run; prints a table, exits 1 if a check blocks."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from fedpeft_edge.config import broker_overrides, load_config
from fedpeft_edge.errors import FedPeftError

if TYPE_CHECKING:
    from fedpeft_edge.client.doctor import Check


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedpeft-agent doctor", description=__doc__)
    p.add_argument("--config", required=True, action="append", metavar="CONFIG.yaml",
                   help="the run's YAML config (same as the server's); repeat to overlay a per-device file "
                   "(--config base.yaml --config node.yaml: later files win, key by key)")
    p.add_argument("--device-id", default=None, help="this device's id (for its state directory)")
    p.add_argument("--broker", default=None, metavar="HOST:PORT", help="MQTT broker (overrides comm_args)")
    p.add_argument("--state-dir", default=None, help="where the agent will keep its state")
    want = p.add_mutually_exclusive_group()
    want.add_argument("--fingerprint", default=None, help="the run's backbone fingerprint (>= 12 hex digits)")
    want.add_argument("--server-summary", default=None, metavar="SUMMARY_JSON",
                      help="the server's RUN_DIR/summary.json, to read the run's backbone fingerprint from")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the broker")
    p.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    return p


def render_table(rows: Sequence[Check]) -> str:
    """check | status | detail, then the verdict."""
    width = max(len(r.name) for r in rows)
    lines = [f"{'check'.ljust(width)}  status  detail", f"{'-' * width}  ------  ------"]
    lines += [f"{r.name.ljust(width)}  {r.status.ljust(6)}  {r.detail}" for r in rows]
    blocking = [r.name for r in rows if r.blocks_join]
    warned = any(r.status == "WARN" for r in rows)
    lines.append("")
    lines.append(f"NOT READY: {len(blocking)} check(s) block a join: {', '.join(blocking)}" if blocking
                 else "ready to join" + (" (with warnings)" if warned else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from fedpeft_edge.client.doctor import expected_fingerprint_from, run_doctor

    overrides = broker_overrides(args.broker) if args.broker else {}
    if args.state_dir:
        overrides["device_args.state_dir"] = args.state_dir
    try:
        cfg = load_config(args.config, overrides)
        expected = args.fingerprint or (expected_fingerprint_from(args.server_summary)
                                        if args.server_summary else None)
        rows = run_doctor(cfg, args.device_id, expected, timeout_s=args.timeout)
    except FedPeftError as exc:
        print(f"fedpeft-agent doctor: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([{"check": r.name, "status": r.status, "detail": r.detail} for r in rows], indent=1))
    else:
        print(render_table(rows))
    return 1 if any(r.blocks_join for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
