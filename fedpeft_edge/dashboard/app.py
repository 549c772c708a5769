"""The dashboard's read-only web app (Starlette): the page, each run's snapshot, and a server-sent event stream.

One `Hub` holds a `FederationState` per run. Records are folded in once, on the run log's sink thread; the
deltas go to every connected browser through one asyncio queue each, so a client costs a queue put per
record and nothing while the federation is idle (no polling of files, no per-client recomputation).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from fedpeft_edge.dashboard.state import FederationState

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
HEARTBEAT_S = 15.0
CLIENT_QUEUE = 1000  # deltas buffered per browser; a client this far behind is dropped and reconnects


class Hub:
    """The runs on show and the browsers listening to each; publish() may be called from any thread."""

    def __init__(self, states: list[FederationState]) -> None:
        self.states = states
        self.loop: asyncio.AbstractEventLoop | None = None
        self._clients: list[set[asyncio.Queue[str | None]]] = [set() for _ in states]

    def publish(self, index: int, delta: dict[str, Any] | None) -> None:
        """Send a delta of run `index` to its browsers (thread-safe; a no-op before the loop runs)."""
        loop = self.loop
        if delta is None or loop is None or not self._clients[index]:
            return
        frame = _sse("delta", delta, delta.get("seq"))
        try:
            loop.call_soon_threadsafe(self._fanout, index, frame)
        except RuntimeError:  # the loop closed while the run goes on
            self.loop = None

    def _fanout(self, index: int, frame: str | None) -> None:
        for q in list(self._clients[index]):
            try:
                q.put_nowait(frame)
            except asyncio.QueueFull:  # end its stream; the browser reconnects and gets a fresh snapshot
                log.warning("dashboard client too slow (%d deltas behind); restarting its stream", CLIENT_QUEUE)
                self._clients[index].discard(q)
                _end(q)

    def subscribe(self, index: int) -> asyncio.Queue[str | None]:
        q: asyncio.Queue[str | None] = asyncio.Queue(CLIENT_QUEUE)
        self._clients[index].add(q)
        return q

    def unsubscribe(self, index: int, q: asyncio.Queue[str | None]) -> None:
        self._clients[index].discard(q)

    def close_clients(self) -> None:
        """End every event stream after the deltas already queued (on shutdown), from the loop's thread."""
        for clients in self._clients:
            for q in clients:
                try:
                    q.put_nowait(None)
                except asyncio.QueueFull:
                    _end(q)
            clients.clear()

    def clients(self) -> int:
        return sum(len(c) for c in self._clients)


def _end(q: asyncio.Queue[str | None]) -> None:
    while not q.empty():
        q.get_nowait()
    q.put_nowait(None)


def build_app(hub: Hub, token: str | None = None, allowed_hosts: Sequence[str] | None = None) -> Starlette:
    """The ASGI app; with a token, every request must carry it (?token=, or Authorization: Bearer); with
    `allowed_hosts`, a request whose Host header names another host is refused (a page under DNS rebinding
    reaches a loopback dashboard with its own name in Host)."""

    def _run(request: Request) -> int:
        try:
            index = int(request.path_params["index"])
        except ValueError:
            index = -1
        if not 0 <= index < len(hub.states):
            raise _NotFound(f"no run {request.path_params['index']}; /api/runs lists 0..{len(hub.states) - 1}")
        return index

    files = _load_static()

    async def index_page(request: Request) -> Response:
        body, media = files["index.html"]
        page = Response(body, media_type=media, headers={"Cache-Control": "no-cache"})
        if token:  # the page's own requests (scripts, styles, events) then carry it as a cookie
            page.set_cookie("fedpeft_token", token, httponly=True, samesite="strict")
        return page

    async def static(request: Request) -> Response:
        found = files.get(request.path_params["path"])
        if found is None:
            raise _NotFound(f"no static file {request.path_params['path']}")
        return Response(found[0], media_type=found[1], headers={"Cache-Control": "max-age=3600"})

    async def runs(_request: Request) -> Response:
        return JSONResponse([{"index": i, "run_id": s.run["run_id"], "run_dir": s.run["run_dir"]}
                             for i, s in enumerate(hub.states)])

    async def state(request: Request) -> Response:
        return Response(_dumps(hub.states[_run(request)].snapshot()), media_type="application/json")

    async def events(request: Request) -> Response:
        index = _run(request)
        return StreamingResponse(_stream(hub, index, request), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        hub.loop = asyncio.get_running_loop()
        try:
            yield
        finally:
            hub.close_clients()
            hub.loop = None

    app = Starlette(
        routes=[Route("/", index_page), Route("/api/runs", runs), Route("/api/state/{index}", state),
                Route("/api/events/{index}", events), Route("/static/{path:path}", static)],
        lifespan=lifespan,
        exception_handlers={_NotFound: _not_found},
    )
    if token:
        app.add_middleware(_TokenMiddleware, token=token)
    if allowed_hosts is not None:
        app.add_middleware(_HostMiddleware, allowed=allowed_hosts)  # outermost: checked before the token
    return app


async def _stream(hub: Hub, index: int, request: Request) -> AsyncIterator[str]:
    """The snapshot, then every delta as it comes; a comment line every HEARTBEAT_S keeps proxies open."""
    q = hub.subscribe(index)
    try:
        snap = hub.states[index].snapshot()
        yield _sse("snapshot", snap, snap["seq"])
        while True:
            try:
                frame = await asyncio.wait_for(q.get(), HEARTBEAT_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return
                yield ": ping\n\n"
                continue
            if frame is None:
                return
            yield frame
    finally:
        hub.unsubscribe(index, q)


_MEDIA = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8", ".md": "text/plain; charset=utf-8"}


def _load_static() -> dict[str, tuple[bytes, str]]:
    """The page's files, read once: serving from memory keeps a page load off the disk and the thread pool."""
    out = {}
    for path in STATIC.rglob("*"):
        if path.is_file():
            out[path.relative_to(STATIC).as_posix()] = (path.read_bytes(), _MEDIA.get(path.suffix, "text/plain"))
    return out


def _sse(event: str, data: dict[str, Any], seq: Any) -> str:
    return f"event: {event}\nid: {seq}\ndata: {_dumps(data)}\n\n"


def _dumps(data: Any) -> str:
    return json.dumps(_finite(data), default=str, separators=(",", ":"))


def _finite(value: Any) -> Any:
    """NaN and infinities become null: the browser's JSON.parse rejects them."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


class _NotFound(Exception):
    pass


async def _not_found(_request: Request, exc: Exception) -> Response:
    return PlainTextResponse(str(exc), status_code=404)


class _HostMiddleware:
    """Refuses (421) any request whose Host header (port aside) is not one of `allowed`."""

    def __init__(self, app: Callable[..., Awaitable[None]], allowed: Sequence[str]) -> None:
        self.app = app
        self.allowed = {h.lower() for h in allowed}

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and host_of(Request(scope).headers.get("host", "")) not in self.allowed:
            response = PlainTextResponse("this dashboard answers only to its own host names (Host header refused)",
                                         status_code=421)
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


def host_of(header: str) -> str:
    """The host of a Host header, without its port ("[::1]:80" -> "::1")."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class _TokenMiddleware:
    """Refuses (401) any request without the dashboard's token; compares in constant time."""

    def __init__(self, app: Callable[..., Awaitable[None]], token: str) -> None:
        self.app = app
        self.token = token.encode()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and not self._allowed(Request(scope)):
            response = PlainTextResponse("this dashboard needs its token: open the URL the server printed "
                                         "(…/?token=...)", status_code=401)
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _allowed(self, request: Request) -> bool:
        given = request.query_params.get("token") or request.cookies.get("fedpeft_token") or ""
        auth = request.headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            given = auth[7:]
        return hmac.compare_digest(given.encode(), self.token)
