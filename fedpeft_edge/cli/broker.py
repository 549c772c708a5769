"""`fedpeft-edge broker [--port N] [--host H] [--kind auto|mosquitto|amqtt|rabbitmq] [--secure DIR]`: a broker
until Ctrl-C; `--secure` runs mosquitto with a provisioned directory's password file, ACL and TLS."""

from __future__ import annotations

import argparse
import signal
import threading
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=1883,
                        help="port to listen on; 0 = a free one (default 1883)")
    parser.add_argument("--kind", default="auto", choices=["auto", "mosquitto", "amqtt", "rabbitmq"],
                        help="mosquitto if installed (auto), the embedded amqtt broker, or a RabbitMQ node")
    parser.add_argument("--rabbitmq", action="store_const", const="rabbitmq", dest="kind",
                        help="same as --kind rabbitmq: a RabbitMQ node with its MQTT plugin (MQTT 3.1.1; "
                        "set comm_args.mqtt_version \"3.1.1\"), its files in a temp dir")
    parser.add_argument("--message-size-limit", type=int, default=None, metavar="BYTES",
                        help="mosquitto only: refuse PUBLISH payloads above this "
                        "(e.g. 131072, AWS IoT Core's limit)")
    parser.add_argument("--secure", metavar="DIR", default=None,
                        help="a `fedpeft-edge provision` directory: no anonymous access, its passwords and ACL, "
                        "TLS if provisioned with --tls (mosquitto only)")


def run(args: argparse.Namespace) -> int:
    from fedpeft_edge.transport.broker import start_broker

    handle = start_broker(args.port or None, args.message_size_limit, host=args.host, kind=args.kind,
                          secure_dir=args.secure)
    mode = f", secured by {args.secure}" if args.secure else ""
    print(f"{handle.kind} broker listening on {handle.host}:{handle.port}{mode} (Ctrl-C to stop)", flush=True)
    if handle.kind == "rabbitmq":
        print('RabbitMQ speaks MQTT 3.1.1 only: set comm_args.mqtt_version: "3.1.1"', flush=True)
    stopping = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        print(f"{signal.Signals(signum).name}: stopping the broker", flush=True)
        stopping.set()

    # SIGTERM (systemd, `kill`, a supervisor) stops the broker like Ctrl-C does: its process is ended and its
    # temporary directory removed, never left listening behind this process.
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while not stopping.wait(1.0):
            pass
    finally:
        handle.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
