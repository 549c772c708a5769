"""`fedpeft-edge broker [--port N] [--host H] [--kind auto|mosquitto|amqtt|rabbitmq]`: a broker until Ctrl-C."""

from __future__ import annotations

import argparse
import threading


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


def run(args: argparse.Namespace) -> int:
    from fedpeft_edge.transport.broker import start_broker

    handle = start_broker(args.port or None, args.message_size_limit, host=args.host, kind=args.kind)
    print(f"{handle.kind} broker listening on {handle.host}:{handle.port} (Ctrl-C to stop)", flush=True)
    if handle.kind == "rabbitmq":
        print('RabbitMQ speaks MQTT 3.1.1 only: set comm_args.mqtt_version: "3.1.1"', flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        handle.stop()
    return 0
