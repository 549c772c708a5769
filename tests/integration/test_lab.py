"""The network lab end to end: real namespaces, tc-shaped veths, relays, mosquitto, server and agent processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from fedpeft_edge.config import load_config
from fedpeft_edge.lab.netns import Topology, cleanup_stale, missing_privileges, our_namespaces
from fedpeft_edge.lab.report import link_rows, relay_bytes, timeline, write_lab_report
from fedpeft_edge.lab.runner import LabRun
from fedpeft_edge.server.runlog import read_metrics

sys.path.insert(0, str(Path(__file__).parent))
from fl_processes import write_config  # noqa: E402

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(missing_privileges() is not None, reason=f"network lab: {missing_privileges()}")]

# 269 kB per full update: 2.2 s at 1 Mbit/s, 0.22 s at 10 Mbit/s, each way.
LAB_VIT = {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 2}


def _root_leftovers() -> list[str]:
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    qdiscs = subprocess.run(["tc", "qdisc", "show"], capture_output=True, text=True).stdout
    return [line for line in (links + qdiscs).splitlines() if "fpl" in line]


@pytest.fixture
def no_leftovers() -> Iterator[None]:
    """After the test: no namespace of ours (with its veths, bridge and qdiscs), nothing in the root namespace."""
    before = set(our_namespaces())
    yield
    left = set(our_namespaces()) - before
    assert not left, f"lab namespaces left behind: {sorted(left)}"
    assert not _root_leftovers(), f"lab interfaces or qdiscs in the root namespace: {_root_leftovers()}"


def _lab_config(tmp_path: Path, run_id: str, lab: dict, **sections: dict) -> Path:
    n = lab["devices"]
    train = {"client_num_in_total": n, "client_num_per_round": n, "min_devices": n, "comm_round": 1,
             "max_steps": 1, **sections.pop("train_args", {})}
    return write_config(tmp_path / "cfg.yaml", 1883, run_id, lab_args={"timeout_s": 180, **lab},
                        train_args=train, peft_args={"method": "full"},
                        model_args={"model_kwargs": LAB_VIT}, device_args={"num_threads": 1, "measure_latency": False},
                        **sections)


def test_shaped_rates_and_latency_are_measured(tmp_path: Path, no_leftovers: None) -> None:
    slow = tmp_path / "10mbit_100ms.yaml"
    slow.write_text(yaml.safe_dump({"name": "10mbit+100ms", "down_mbit": 10, "up_mbit": 10, "latency_ms": 100}))
    path = _lab_config(tmp_path, "lab-rates", {"devices": 3, "links": ["10mbit", "1mbit", str(slow)]})
    cfg = load_config(path)
    result = LabRun(cfg, path, tmp_path / "lab").run()
    assert result.server_rc == 0, (tmp_path / "lab" / "server.log").read_text()[-3000:]
    rows = {r.device_id: r for r in link_rows(result.run_dir, result.links)}
    assert set(rows) == {"d0", "d1", "d2"}
    for d in ("d0", "d1"):
        r = rows[d]
        assert r.bytes_down > 250_000 and r.bytes_up > 250_000  # the same full update each way
        print(f"{d} {r.link}: down {r.download_s:.3f} s (size/rate {r.ideal_down_s:.3f} s), "
              f"up {r.upload_s:.3f} s (size/rate {r.ideal_up_s:.3f} s)")
        assert r.download_s is not None and r.ideal_down_s is not None
        assert r.upload_s is not None and r.ideal_up_s is not None
        assert abs(r.download_s / r.ideal_down_s - 1) < 0.15
        assert abs(r.upload_s / r.ideal_up_s - 1) < 0.15
    fast, lagged = rows["d0"], rows["d2"]
    print(f"+100 ms: download {fast.download_s:.3f} -> {lagged.download_s:.3f} s, "
          f"upload {fast.upload_s:.3f} -> {lagged.upload_s:.3f} s")
    assert lagged.download_s - fast.download_s > 0.08  # type: ignore[operator]
    assert lagged.upload_s - fast.upload_s > 0.08  # type: ignore[operator]
    segs = timeline(result.run_dir, result.started_at)
    assert {s.phase for s in segs if s.device_id == "d1"} >= {"download", "train", "upload"}
    report = write_lab_report(result, cfg)
    assert all(p.exists() and p.stat().st_size > 0 for p in report.files)
    assert {p.link for p in report.predictions} == {"10mbit", "1mbit", "10mbit+100ms"}
    print(report.table)
    bins, _ = relay_bytes(result.relay_logs["d1"])
    assert sum(b.get("down", 0) for b in bins) >= rows["d1"].bytes_down  # the relay saw the update cross


@pytest.mark.slow
def test_link_cut_mid_round_reconnects_and_run_completes(tmp_path: Path, no_leftovers: None) -> None:
    lab = {"devices": 2, "links": ["10mbit"],
           "outages": [{"device": "d1", "duration_s": 20, "at_round": 2, "after_s": 0.1}]}
    # min_updates 2: round 2 cannot close without d1, so the run completes only if d1 comes back
    path = _lab_config(tmp_path, "lab-cut", lab, train_args={"comm_round": 3, "min_updates": 2})
    cfg = load_config(path)
    result = LabRun(cfg, path, tmp_path / "lab").run()
    logs = "\n".join(f"--- {p.name}\n{p.read_text()[-2500:]}" for p in (tmp_path / "lab").glob("*.log"))
    assert result.server_rc == 0, logs
    rounds = [r for r in read_metrics(result.run_dir, "round") if r.get("status") == "aggregated"]
    assert [r["round"] for r in rounds] == [1, 2, 3], logs
    assert json.loads((result.run_dir / "summary.json").read_text())["rounds"] == 3
    _, events = relay_bytes(result.relay_logs["d1"])
    assert [e["event"] for e in events] == ["cut", "restore"]
    assert len(result.outages) == 1
    joins = [r for r in read_metrics(result.run_dir, "join") if r["device_id"] == "d1"]
    assert len(joins) >= 2, logs  # it noticed the dead link (keepalive), reconnected after it and joined again
    last = [r for r in read_metrics(result.run_dir, "device_round") if r["device_id"] == "d1" and r["round"] == 3]
    assert "accepted" in {r["status"] for r in last}, logs


def test_a_killed_runs_namespaces_are_removed(tmp_path: Path, no_leftovers: None) -> None:
    from fedpeft_edge.config import LinkProfile

    topo = Topology.plan({"d0": LinkProfile(name="1mbit", down_mbit=1, up_mbit=1)}, state_dir=tmp_path)
    topo.build()
    dead = subprocess.Popen(["true"])
    dead.wait()
    state = tmp_path / f"{topo.tag}.json"
    state.write_text(json.dumps({"pid": dead.pid, "namespaces": topo.namespaces()}))  # its owner was killed
    assert set(topo.namespaces()) <= set(our_namespaces())
    removed = cleanup_stale(tmp_path)
    assert set(removed) == set(topo.namespaces())
    assert not state.exists()


def test_cleanup_command_runs(tmp_path: Path) -> None:
    env = {**os.environ}
    proc = subprocess.run([sys.executable, "-m", "fedpeft_edge.cli", "lab", "--cleanup"], capture_output=True,
                          text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "removed" in proc.stdout
