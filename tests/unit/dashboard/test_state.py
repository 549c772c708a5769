"""FederationState: records fold into the dashboard's view; each delta merged into a snapshot equals the next."""

from __future__ import annotations

import copy
from typing import Any

from fedpeft_edge.dashboard.state import FederationState

T0 = 1_700_000_000.0

RECORDS: list[dict[str, Any]] = [
    {"kind": "join", "time": T0, "device_id": "dev0", "accepted": True, "reason": None, "num_samples": 90,
     "profile": {"accelerator": "cpu:ARM", "cpu_count_logical": 4, "ram_total_mb": 4096, "link": "4g"}},
    {"kind": "join", "time": T0 + 1, "device_id": "dev1", "accepted": True, "reason": None, "num_samples": 80,
     "profile": {}},
    {"kind": "round_open", "time": T0 + 2, "round": 1, "attempt": 1, "selected": ["dev0", "dev1"],
     "deadline": T0 + 62, "opened_at": T0 + 2, "mode": "sync"},
    {"kind": "device_round", "time": T0 + 5, "round": 1, "attempt": 1, "device_id": "dev0", "status": "accepted",
     "drop_reason": None, "bytes_down": 1000, "bytes_up": 1200, "epsilon": 0.7, "train_loss": 2.1,
     "resources": {"cpu_s": 1.5, "cpu_util_pct": 80.0, "rss_peak_mb": 512.0, "energy_j": 3.0}},
    {"kind": "device_round", "time": T0 + 6, "round": 1, "attempt": 1, "device_id": "dev1", "status": "dropped",
     "drop_reason": "invalid: bad tensor", "bytes_down": 1000, "bytes_up": 0},
    {"kind": "round", "time": T0 + 7, "round": 1, "attempt": 1, "status": "aggregated", "selected": ["dev0", "dev1"],
     "accepted": 1, "dropped": {"invalid": 1}, "bytes_down": 2000, "bytes_up": 1200, "cum_bytes": 3200,
     "round_s": 5.0, "eval": {"top1": 0.4, "loss": 1.9, "samples": 100}, "devices_online": 2},
    {"kind": "presence", "time": T0 + 8, "device_id": "dev1", "online": False},
    {"kind": "dropped_message", "time": T0 + 9, "sender": "x", "topic": "t", "reason": "undecodable",
     "detail": "bad frame", "bytes": 12},
    {"kind": "checkpoint_written", "time": T0 + 10},  # an unknown kind changes nothing
]


def _merge(snap: dict[str, Any], d: dict[str, Any]) -> None:
    """What dashboard.js does with a delta."""
    snap["run"].update(d.get("run", {}))
    snap["devices"].update(d.get("devices", {}))
    if "round" in d:
        snap["rounds"].append(d["round"])
    if "current" in d:
        snap["current"] = d["current"]
    if "dropped_messages" in d:
        snap["dropped_messages"] = d["dropped_messages"]
    snap["seq"] = d["seq"]


def test_records_fold_into_devices_rounds_and_the_open_round() -> None:
    s = FederationState("r", "/runs/r", {"comm_round": 3})
    seen_current = None
    for rec in RECORDS:
        s.apply(rec)
        if rec["kind"] == "device_round":
            seen_current = copy.deepcopy(s.current)
    snap = s.snapshot()
    d0, d1 = snap["devices"]["dev0"], snap["devices"]["dev1"]
    assert d0["online"] and d0["profile"] == "4g, cpu:ARM, 4 CPUs, 4 GiB"
    assert (d0["cpu_s"], d0["rss_peak_mb"], d0["energy_j"], d0["epsilon"]) == (1.5, 512.0, 3.0, 0.7)
    assert d1["online"] is False and d1["drops"] == {"invalid": 1} and d1["last_seen"] == T0 + 8
    assert seen_current is not None and seen_current["answered"] == {"dev0": "accepted", "dev1": "dropped"}
    assert snap["current"] is None  # the round closed
    assert snap["rounds"][0]["top1"] == 0.4 and snap["rounds"][0]["cum_bytes"] == 3200
    assert snap["dropped_messages"] == {"undecodable": 1}
    assert snap["seq"] == len(RECORDS) - 1


def test_deltas_rebuild_the_snapshot() -> None:
    s = FederationState("r", "/runs/r")
    client = s.snapshot()
    for rec in RECORDS:
        delta = s.apply(rec)
        if delta is not None:
            _merge(client, copy.deepcopy(delta))
    server = s.snapshot()
    for key in ("devices", "rounds", "current", "dropped_messages", "seq"):
        assert client[key] == server[key], key
    assert any(d["online"] for d in client["devices"].values())
    fin = s.mark_finished({"rounds": 1})
    _merge(client, fin)
    assert client["run"]["finished"] and client["run"]["summary"] == {"rounds": 1}
    assert not any(d["online"] for d in client["devices"].values())  # a finished run has no device online
    assert client["devices"] == s.snapshot()["devices"]


def test_an_assignment_shows_the_devices_rank_and_reason() -> None:
    s = FederationState("r", "/runs/r")
    s.apply(RECORDS[0])
    delta = s.apply({"kind": "assignment", "time": T0 + 1, "device_id": "dev0", "after_round": None, "rank": 4,
                     "reason": "memory: 4096 MB"})
    assert delta is not None and delta["devices"]["dev0"]["rank"] == 4
    assert s.snapshot()["devices"]["dev0"]["rank_reason"] == "memory: 4096 MB"
