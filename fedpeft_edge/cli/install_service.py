"""`fedpeft-edge install-service`: write a systemd unit that runs this device's agent as a service."""

from __future__ import annotations

import argparse
import getpass
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--user", default=None, help="the non-root user the agent runs as (default: you)")
    parser.add_argument("--group", default=None, help="its group (default: the user's primary group)")
    parser.add_argument("--config", required=True, help="the run's YAML on this device")
    parser.add_argument("--device-id", required=True, help="this device's id")
    parser.add_argument("--python", default=sys.executable,
                        help="the agent venv's python (default: the one running this command)")
    parser.add_argument("--output", default=None, metavar="PATH",
                        help="where to write the unit (default: print it; e.g. /etc/systemd/system/...)")


def run(args: argparse.Namespace) -> int:
    from fedpeft_edge.client.service import ServiceSpec, render_systemd_unit
    from fedpeft_edge.config import load_config

    load_config(args.config)  # a unit that would fail at start is refused now
    spec = ServiceSpec(user=args.user or getpass.getuser(), group=args.group,
                       config=Path(args.config).expanduser().resolve(), device_id=args.device_id,
                       python=Path(args.python).expanduser().absolute())
    text = render_systemd_unit(spec)
    if args.output is None:
        sys.stdout.write(text)
        return 0
    out = Path(args.output)
    if out.is_dir():
        out = out / spec.unit_name
    out.write_text(text, encoding="utf-8")
    print(f"wrote {out}; then: sudo systemctl daemon-reload && sudo systemctl enable --now {spec.unit_name}")
    print(f"logs: journalctl -u {spec.unit_name} -f; state: {spec.state_dir}")
    return 0
