"""The dashboard web app on a real uvicorn (loopback): pages, snapshots, the event stream, the token."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from fedpeft_edge.dashboard.app import Hub
from fedpeft_edge.dashboard.server import DashboardServer, LiveSink, parse_bind
from fedpeft_edge.dashboard.state import FederationState
from fedpeft_edge.errors import DashboardError


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes, Any]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read(), r.headers
    except urllib.error.HTTPError as e:
        return e.code, e.read(), e.headers


def _frame(stream: Any) -> dict[str, Any]:
    """The next server-sent event (skipping heartbeats) as {event, id, data}."""
    fields: dict[str, Any] = {}
    while True:
        line = stream.readline().decode().rstrip("\n")
        if not line:
            if "data" in fields:
                fields["data"] = json.loads(fields["data"])
                return fields
            continue
        if line.startswith(":"):
            continue
        key, _, value = line.partition(": ")
        fields[key] = value


@pytest.fixture
def served(tmp_path: Any) -> Iterator[tuple[DashboardServer, FederationState]]:
    state = FederationState("run-a", str(tmp_path), {"comm_round": 2})
    server = DashboardServer(Hub([state]), "127.0.0.1", 0).start()
    yield server, state
    server.stop()


def test_page_static_files_and_snapshot(served: tuple[DashboardServer, FederationState]) -> None:
    server, state = served
    state.apply({"kind": "join", "time": 1.0, "device_id": "dev0", "accepted": True})
    status, body, _ = _get(server.url)
    assert status == 200 and b"uPlot.iife.min.js" in body
    status, body, _ = _get(server.url + "static/uplot/uPlot.iife.min.js")
    assert status == 200 and len(body) > 40_000
    status, body, _ = _get(server.url + "api/runs")
    assert json.loads(body) == [{"index": 0, "run_id": "run-a", "run_dir": state.run["run_dir"]}]
    snap = json.loads(_get(server.url + "api/state/0")[1])
    assert list(snap["devices"]) == ["dev0"] and snap["run"]["comm_round"] == 2
    assert _get(server.url + "api/state/3")[0] == 404
    req = urllib.request.Request(server.url, data=b"x", method="POST")
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(req, timeout=10)
    assert exc.value.code == 405  # read-only


def test_event_stream_sends_the_snapshot_then_live_deltas(served: tuple[DashboardServer, FederationState]) -> None:
    server, state = served
    sink = LiveSink(server.hub, 0, __import__("pathlib").Path(state.run["run_dir"]))
    with urllib.request.urlopen(server.url + "api/events/0", timeout=10) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        first = _frame(stream)
        assert first["event"] == "snapshot" and first["data"]["devices"] == {}
        sink.write({"kind": "join", "time": 2.0, "device_id": "dev7", "accepted": True, "profile": {}})
        sink.write({"kind": "round", "time": 3.0, "round": 1, "status": "aggregated", "eval": {"top1": float("nan")},
                    "cum_bytes": 10})
        delta = _frame(stream)
        assert delta["event"] == "delta" and delta["data"]["devices"]["dev7"]["online"] is True
        delta = _frame(stream)
        assert delta["data"]["round"]["round"] == 1 and delta["data"]["round"]["top1"] is None  # NaN -> null
        assert int(delta["id"]) == state.seq == 2


def test_a_token_guards_every_request(tmp_path: Any) -> None:
    server = DashboardServer(Hub([FederationState("r", str(tmp_path))]), "127.0.0.1", 0, token="s3cret").start()
    try:
        base = server.url.split("?")[0]
        assert server.url.endswith("?token=s3cret")
        assert _get(base + "api/runs")[0] == 401
        assert _get(base + "static/dashboard.js")[0] == 401
        assert _get(base + "api/runs?token=wrong")[0] == 401
        assert _get(base + "api/runs", {"Authorization": "Bearer s3cret"})[0] == 200
        status, _, headers = _get(server.url)
        assert status == 200 and "fedpeft_token=s3cret" in headers["set-cookie"]
        assert _get(base + "static/dashboard.js", {"Cookie": "fedpeft_token=s3cret"})[0] == 200
    finally:
        server.stop()


def test_off_loopback_always_gets_a_token_and_bad_addresses_are_refused() -> None:
    hub = Hub([FederationState("r", "/x")])
    assert DashboardServer(hub, "0.0.0.0", 0).token  # not started: only the policy is checked
    assert DashboardServer(hub, "127.0.0.1", 0).token is None
    assert parse_bind("8765") == ("127.0.0.1", 8765)
    assert parse_bind("0.0.0.0:80") == ("0.0.0.0", 80)
    assert parse_bind("[::1]:9000") == ("::1", 9000)
    for bad in ("http", "host:99999", "x:"):
        with pytest.raises(DashboardError, match="dashboard"):
            parse_bind(bad)


def test_finished_runs_load_side_by_side(tmp_path: Any) -> None:
    from fedpeft_edge.config import config_from_dict, dump_config
    from fedpeft_edge.dashboard.server import load_runs
    from fedpeft_edge.server.runlog import RunLog

    dirs = []
    for name, rounds in (("a", 2), ("b", 3)):
        run_dir = tmp_path / name
        log = RunLog(run_dir)
        for r in range(1, rounds + 1):
            log.write("round", round=r, status="aggregated", eval={"top1": 0.1 * r}, cum_bytes=100 * r)
        log.close()
        dump_config(config_from_dict({"train_args": {"comm_round": rounds}}), run_dir / "config.yaml")
        dirs.append(run_dir)
    (dirs[0] / "summary.json").write_text('{"rounds": 2}')
    hub = load_runs(dirs)
    a, b = (s.snapshot() for s in hub.states)
    assert (a["run"]["run_id"], len(a["rounds"]), a["run"]["finished"], a["run"]["comm_round"]) == ("a", 2, True, 2)
    assert (b["run"]["run_id"], len(b["rounds"]), b["run"]["finished"]) == ("b", 3, False)
    with pytest.raises(DashboardError, match="no metrics.jsonl"):
        load_runs([tmp_path / "missing"])


def test_a_loopback_dashboard_refuses_foreign_host_headers(served: tuple[DashboardServer, FederationState]) -> None:
    """DNS rebinding: a page of evil.example whose name now resolves to 127.0.0.1 sends Host: evil.example."""
    server, _ = served
    base = server.url
    assert _get(base + "api/state/0", {"Host": "evil.example"})[0] == 421
    assert _get(base + "api/state/0", {"Host": f"evil.example:{server.port}"})[0] == 421
    assert _get(base + "api/state/0", {"Host": f"localhost:{server.port}"})[0] == 200
    assert _get(base + "api/state/0")[0] == 200  # 127.0.0.1:port


def test_the_token_comes_from_a_file_or_the_environment(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from fedpeft_edge.dashboard.app import host_of
    from fedpeft_edge.dashboard.server import TOKEN_ENV, allowed_hosts, read_token

    monkeypatch.delenv(TOKEN_ENV, raising=False)
    assert read_token(None) is None
    monkeypatch.setenv(TOKEN_ENV, "from-env")
    assert read_token(None) == "from-env"
    f = tmp_path / "token"
    f.write_text("from-file\n")
    assert read_token(f) == "from-file"
    (tmp_path / "empty").write_text("")
    with pytest.raises(DashboardError, match="empty"):
        read_token(tmp_path / "empty")
    assert host_of("[::1]:80") == "::1" and host_of("LocalHost:8") == "localhost" and host_of("a") == "a"
    assert allowed_hosts("0.0.0.0") is None and "localhost" in (allowed_hosts("127.0.0.1") or [])
