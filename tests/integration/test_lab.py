"""The network lab end to end: real namespaces, tc-shaped veths, relays, mosquitto, server and agent processes."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
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


def _start_lab(tmp_path: Path) -> tuple[subprocess.Popen[bytes], Path]:
    path = _lab_config(tmp_path, "lab-kill", {"devices": 2, "links": ["1mbit"]})
    proc = subprocess.Popen([sys.executable, "-m", "fedpeft_edge.cli", "lab", "--config", str(path), "--no-report",
                             "--work-dir", str(tmp_path / "lab")], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return proc, path


def _wait_for_namespaces(before: set[str], count: int, timeout: float = 30.0) -> set[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        mine = set(our_namespaces()) - before
        if len(mine) >= count and (Path("/run/netns") / sorted(mine)[0]).exists():
            return mine
        time.sleep(0.2)
    raise AssertionError("the lab did not create its namespaces")


def test_sigterm_removes_the_namespaces(tmp_path: Path, no_leftovers: None) -> None:
    before = set(our_namespaces())
    proc, _ = _start_lab(tmp_path)
    mine = _wait_for_namespaces(before, 4)
    time.sleep(3)  # programs starting inside them
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert not set(our_namespaces()) & mine, err.decode()[-2000:]


def test_after_sigkill_the_next_run_cleans_up(tmp_path: Path, no_leftovers: None) -> None:
    before = set(our_namespaces())
    proc, _ = _start_lab(tmp_path)
    mine = _wait_for_namespaces(before, 4)
    time.sleep(3)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    assert mine <= set(our_namespaces())  # a killed lab cannot clean up itself
    pids = [p for ns in mine for p in subprocess.run(["ip", "netns", "pids", ns], capture_output=True,
                                                     text=True).stdout.split()]
    out = subprocess.run([sys.executable, "-m", "fedpeft_edge.cli", "lab", "--cleanup"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert not set(our_namespaces()) & mine
    deadline = time.monotonic() + 5
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)  # SIGKILLed processes take a moment to exit
    assert pids and not any(_alive(p) for p in pids)  # what ran inside them is gone too


def _alive(pid: str) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False
