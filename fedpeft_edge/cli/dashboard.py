"""`fedpeft-edge dashboard RUN_DIR [RUN_DIR ...]`: the live dashboard's views of finished runs, side by side."""

from __future__ import annotations

import argparse
import time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories written by fedpeft-server")
    parser.add_argument("--bind", default="127.0.0.1:8765", metavar="[HOST:]PORT",
                        help="where to serve (default 127.0.0.1:8765; another host requires a token)")
    parser.add_argument("--token-file", default=None, metavar="FILE",
                        help="a file whose first line is the token to require (or set $FEDPEFT_DASHBOARD_TOKEN; "
                        "default: a random one off loopback)")


def run(args: argparse.Namespace) -> int:
    from fedpeft_edge.dashboard.server import DashboardServer, load_runs, parse_bind, read_token

    host, port = parse_bind(args.bind)
    hub = load_runs(args.run_dirs)
    server = DashboardServer(hub, host, port, read_token(args.token_file)).start()
    print(f"dashboard of {len(hub.states)} run(s) at {server.url}  (Ctrl-C to stop)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0
