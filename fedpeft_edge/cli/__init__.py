"""The `fedpeft-edge` umbrella command: demo, profile, report, export, broker, simulate, dashboard and more.

Each subcommand lives in its own module here exposing `add_arguments(parser)` and `run(args) -> int`;
modules are imported only when their subcommand runs, so `fedpeft-edge profile` never loads MQTT code.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from fedpeft_edge.errors import FedPeftError

SUBCOMMANDS: dict[str, str] = {
    "demo": "run a short FedPEFT job on this machine: broker, server and N agent processes",
    "profile": "parameters and encoded update bytes per PEFT method for a model; bandwidth planning",
    "report": "write report.html, PNG plots and CSVs from one or more run directories",
    "export": "export a fine-tuned model from a run to ONNX, with a parity check",
    "broker": "run a local MQTT broker (mosquitto if installed, else embedded amqtt)",
    "install-service": "write a systemd unit that runs this device's agent as a non-root service",
    "simulate": "run the server and N devices in one process on one shared backbone (no broker)",
    "dashboard": "serve the federation dashboard for finished runs, side by side",
    "lab": "a run over emulated links: device namespaces, tc rates, latency, loss and outages; network report",
    "provision": "create per-device credentials, broker password file and ACL, signing keys, optional TLS",
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    """The parser; only the chosen subcommand's module is imported (all of them for --help)."""
    parser = argparse.ArgumentParser(prog="fedpeft-edge", description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = next((a for a in argv if a in SUBCOMMANDS), None)
    for name, help_text in SUBCOMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        sp.set_defaults(_module=name)
        if name == chosen:
            _load(name).add_arguments(sp)
    return parser


def _load(name: str):  # type: ignore[no-untyped-def]
    return importlib.import_module(f"fedpeft_edge.cli.{name.replace('-', '_')}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(_load(args._module).run(args) or 0)
    except FedPeftError as exc:
        print(f"fedpeft-edge {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
