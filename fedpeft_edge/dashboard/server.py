"""Serving the dashboard: uvicorn on a background thread, fed live by a run-log sink or from finished runs."""

from __future__ import annotations

import time

_T0 = time.thread_time()  # importing the web stack is part of what a dashboard costs the server

import asyncio  # noqa: E402
import contextlib  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import secrets  # noqa: E402
import socket  # noqa: E402
import threading  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import uvicorn  # noqa: E402

from fedpeft_edge.config import is_loopback  # noqa: E402
from fedpeft_edge.dashboard.app import Hub, build_app  # noqa: E402
from fedpeft_edge.dashboard.state import FederationState  # noqa: E402
from fedpeft_edge.errors import DashboardError, FedPeftError  # noqa: E402
from fedpeft_edge.rundir import read_summary  # noqa: E402
from fedpeft_edge.server.runlog import RunLog, read_metrics  # noqa: E402

IMPORT_CPU_S = time.thread_time() - _T0
log = logging.getLogger(__name__)

_START_TIMEOUT_S = 15.0


def parse_bind(text: str) -> tuple[str, int]:
    """`[HOST:]PORT` -> (host, port); the host defaults to 127.0.0.1, port 0 picks a free one."""
    host, _, port_text = text.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    try:
        port = int(port_text)
    except ValueError:
        raise DashboardError(f"dashboard address {text!r} is not [HOST:]PORT; e.g. 8765 or 0.0.0.0:8765") from None
    if not 0 <= port <= 65535:
        raise DashboardError(f"dashboard port {port} is outside 0..65535")
    return host, port


TOKEN_ENV = "FEDPEFT_DASHBOARD_TOKEN"  # a token is never taken from a command line (ps shows it to every user)


def read_token(token_file: str | Path | None) -> str | None:
    """The dashboard token: the first line of `token_file`, else $FEDPEFT_DASHBOARD_TOKEN, else None."""
    if token_file is not None:
        try:
            text = Path(token_file).read_text(encoding="utf-8")
        except OSError as exc:
            raise DashboardError(f"cannot read the dashboard token file {token_file}: {exc}") from exc
        token = text.splitlines()[0].strip() if text.strip() else ""
        if not token:
            raise DashboardError(f"the dashboard token file {token_file} is empty; write the token on its first line")
        return token
    return os.environ.get(TOKEN_ENV) or None


def allowed_hosts(host: str) -> list[str] | None:
    """Host header values the dashboard answers: loopback names, and off loopback this machine's own names and
    address; None (any) for a wildcard bind, where the token (always required off loopback) is the guard."""
    if host in ("0.0.0.0", "::", ""):
        return None
    names = ["localhost", "127.0.0.1", "::1", host]
    if not is_loopback(host):
        names += [socket.gethostname(), socket.getfqdn()]
    return names


def run_info(cfg: Any) -> dict[str, Any]:
    """What the page's header says about a run, from its RunConfig."""
    return {"comm_round": cfg.train_args.comm_round, "method": cfg.peft_args.method, "model": cfg.model_args.model,
            "dataset": cfg.data_args.dataset, "encoding": cfg.comm_args.encoding,
            "devices_per_round": cfg.train_args.client_num_per_round,
            "round_timeout_s": cfg.train_args.round_timeout_s}


class _QuietServer(uvicorn.Server):
    """uvicorn's supervising loop wakes ten times a second to look for shutdown; this one sleeps until told to
    stop (no Date header to refresh: the dashboard sends none), so an idle dashboard costs the server nothing."""

    _wake: asyncio.Event | None = None
    _loop: asyncio.AbstractEventLoop | None = None

    async def main_loop(self) -> None:
        self._loop, self._wake = asyncio.get_running_loop(), asyncio.Event()
        while not await self.on_tick(1):  # counter 1: skip the once-a-second header refresh
            await self._wake.wait()
            self._wake.clear()

    def request_exit(self) -> None:
        """Stop serving (from any thread)."""
        self.should_exit = True
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None:
            with contextlib.suppress(RuntimeError):  # the loop already closed
                loop.call_soon_threadsafe(wake.set)


class DashboardServer:
    """uvicorn serving one Hub on a daemon thread; `url` carries the token when there is one."""

    def __init__(self, hub: Hub, host: str = "127.0.0.1", port: int = 0, token: str | None = None) -> None:
        if token is None and not is_loopback(host):
            token = secrets.token_urlsafe(18)  # never serve a federation's view off-host without a token
        self.hub, self.host, self.token = hub, host, token
        config = uvicorn.Config(build_app(hub, token, allowed_hosts(host)), host=host, port=port, log_level="warning",
                                access_log=False,
                                lifespan="on", timeout_graceful_shutdown=2, ws="none",
                                date_header=False)
        self._server = _QuietServer(config)
        self._thread = threading.Thread(target=self._serve, name="dashboard", daemon=True)
        self.port = port
        self.cpu_s: dict[str, float] = {"startup": 0.0, "web": 0.0, "records": 0.0}
        self.sink: LiveSink | None = None

    def _serve(self) -> None:
        t0 = time.thread_time()
        try:
            self._server.run()
        finally:
            self.cpu_s["web"] = time.thread_time() - t0

    def start(self) -> DashboardServer:
        self._thread.start()
        deadline = time.monotonic() + _START_TIMEOUT_S
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise DashboardError(f"the dashboard could not listen on {self.host}:{self.port} (port taken, or "
                                     "the address is not this machine's); pick another with --dashboard HOST:PORT")
            time.sleep(0.02)
        servers = getattr(self._server, "servers", None) or []
        if servers and servers[0].sockets:
            self.port = int(servers[0].sockets[0].getsockname()[1])
        return self

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        shown = "127.0.0.1" if host in ("0.0.0.0", "[::]") else host
        return f"http://{shown}:{self.port}/" + (f"?token={self.token}" if self.token else "")

    def stop(self) -> None:
        """End the event streams once the browsers got what is queued (the run's end), then stop serving."""
        loop = self.hub.loop
        if loop is not None and self._thread.is_alive():
            try:
                loop.call_soon_threadsafe(self.hub.close_clients)
                time.sleep(0.3)
            except RuntimeError:
                pass
        self._server.request_exit()
        self._thread.join(timeout=10)
        if self.sink is not None:
            self.cpu_s["records"] = self.sink.cpu_s
        log.info("dashboard CPU %.3f s (start-up %.3f, web thread %.3f, folding records %.3f)",
                 sum(self.cpu_s.values()), self.cpu_s["startup"], self.cpu_s["web"], self.cpu_s["records"])


class LiveSink:
    """The run-log sink behind a live dashboard: folds each record into the run's state, pushes the delta."""

    def __init__(self, hub: Hub, index: int, run_dir: Path) -> None:
        self.hub, self.index, self.run_dir = hub, index, run_dir
        self.cpu_s = 0.0  # this sink thread's CPU, for the dashboard's cost figure

    def write(self, record: dict[str, Any]) -> None:
        t0 = time.thread_time()
        self.hub.publish(self.index, self.hub.states[self.index].apply(record))
        self.cpu_s += time.thread_time() - t0

    def close(self) -> None:
        summary = _summary(self.run_dir)
        if summary is not None:
            self.hub.publish(self.index, self.hub.states[self.index].mark_finished(summary))


def serve_live(
    runlog: RunLog, run_id: str, info: dict[str, Any], bind: str, token: str | None = None
) -> DashboardServer:
    """Start a dashboard for the run being written to runlog (records already on disk are replayed)."""
    t0 = time.thread_time()
    host, port = parse_bind(bind)
    state = FederationState(run_id, str(runlog.run_dir), info)
    hub = Hub([state])
    server = DashboardServer(hub, host, port, token).start()
    server.sink = LiveSink(hub, 0, runlog.run_dir)
    runlog.add_sink(server.sink, replay=True)
    server.cpu_s["startup"] = IMPORT_CPU_S + time.thread_time() - t0
    return server


def load_runs(run_dirs: Sequence[str | Path]) -> Hub:
    """A Hub of finished (or stopped) runs, each folded from its metrics.jsonl once."""
    states = []
    for d in run_dirs:
        run_dir = Path(d)
        if not (run_dir / "metrics.jsonl").exists():
            raise DashboardError(f"{run_dir} holds no metrics.jsonl; pass run directories written by fedpeft-server")
        state = FederationState(run_dir.name, str(run_dir), _saved_info(run_dir))
        for rec in read_metrics(run_dir):
            state.apply(rec)
        summary = _summary(run_dir)
        if summary is not None:
            state.mark_finished(summary)
        states.append(state)
    return Hub(states)


def _saved_info(run_dir: Path) -> dict[str, Any]:
    from fedpeft_edge.config import load_config

    try:
        return run_info(load_config(run_dir / "config.yaml"))
    except FedPeftError as exc:
        log.warning("%s: no run details shown (%s)", run_dir, exc)
        return {}


def _summary(run_dir: Path) -> dict[str, Any] | None:
    """The run's summary.json as the browser gets it (rundir.read_summary: typed, any version), or None."""
    summary = read_summary(run_dir)
    return summary.to_dict() if summary is not None else None
