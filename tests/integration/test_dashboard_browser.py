"""The live dashboard in real headless Chromium during a real run: mosquitto, a server process serving
--dashboard, two agent processes. The page lists every device and its round counter advances with no reload.
The same run (one run: they are slow to start) has TensorBoard and MLflow enabled; both are read back with
their own readers and must match the run's metrics.jsonl."""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
from brokers import free_port
from browser import start_chromium
from fl_processes import REPO, Procs, aggregated_rounds, records, run_dir_of, wait_for, write_config

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]

ROUNDS = 6
ARTEFACTS = Path(os.environ.get("FEDPEFT_TEST_ARTIFACTS", REPO / "build" / "test-artifacts"))

_READ_PAGE = """
const p = document.querySelector('.run-panel');
if (!p) return null;
return {counter: p.querySelector('[data-round-counter]').textContent,
        devices: [...p.querySelectorAll('table.devices tbody tr')].map(tr => tr.dataset.deviceId),
        status: p.querySelector('.run-status').textContent,
        current: p.querySelector('.current-body').textContent,
        marker: window.__fedpeftMarker || null};
"""


@pytest.fixture
def procs(tmp_path: Path):  # type: ignore[no-untyped-def]
    p = Procs(tmp_path / "logs")
    yield p
    p.stop_all()


def _dashboard_url(procs: Procs) -> str:
    found: list[str] = []

    def printed() -> bool:
        m = re.search(r"dashboard at (http://\S+)", procs.log("server"))
        if m:
            found.append(m.group(1))
        return bool(m)

    wait_for("the server to print its dashboard URL", printed, 120, procs)
    return found[0]


def _save(driver: Any, tmp_path: Path, name: str) -> Path:
    shot = tmp_path / name
    driver.save_screenshot(str(shot))
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    stable = ARTEFACTS / name
    shutil.copyfile(shot, stable)
    print(f"dashboard screenshot: {stable}")
    return stable


def test_live_page_and_trackers_follow_a_real_run(mosquitto_broker: Any, tmp_path: Path, procs: Procs) -> None:
    cfg = write_config(tmp_path / "run.yaml", mosquitto_broker.port, "dash",
                       train_args={"comm_round": ROUNDS}, data_args={"max_train_samples": 480},
                       tracking_args={"run_dir": str(tmp_path / "runs"), "log_level": "INFO",
                                      "enable_tensorboard": True, "enable_mlflow": True})
    run_dir = run_dir_of(cfg)
    procs.start("server", "server_app.main", "--config", str(cfg), "--dashboard", f"127.0.0.1:{free_port()}")
    url = _dashboard_url(procs)
    driver = start_chromium(tmp_path / "chromium-profile")
    try:
        driver.set_page_load_timeout(60)
        driver.get(url)
        wait_for("the page's first snapshot", lambda: "waiting" in ((driver.execute_script(_READ_PAGE) or {})
                                                                    .get("status") or ""), 60, procs)
        driver.execute_script("window.__fedpeftMarker = 'loaded-once';")  # a reload would wipe it
        before = driver.execute_script(_READ_PAGE)
        assert before["devices"] == [] and before["counter"] == "0"

        for i in range(2):
            procs.agent(cfg, f"dev{i}", i)
        counters: list[int] = []
        mid_shot = None
        deadline = time.monotonic() + 200
        while time.monotonic() < deadline:
            page = driver.execute_script(_READ_PAGE)
            counters.append(int(page["counter"]))
            if mid_shot is None and int(page["counter"]) >= 1 and "Round" in page["current"]:
                mid_shot = _save(driver, tmp_path, "dashboard-live.png")
            if counters[-1] >= ROUNDS:
                break
            time.sleep(0.25)
        page = driver.execute_script(_READ_PAGE)
        _save(driver, tmp_path, "dashboard-end.png")
    finally:
        driver.quit()
    assert aggregated_rounds(run_dir) == list(range(1, ROUNDS + 1)), procs.logs()
    assert sorted(page["devices"]) == ["dev0", "dev1"]
    assert counters[-1] == ROUNDS, f"counter stopped at {counters[-1]}; saw {sorted(set(counters))}"
    assert counters == sorted(counters) and counters[0] == 0, f"round counter values seen: {counters}"
    assert page["marker"] == "loaded-once", "the page reloaded"

    wait_for("the server to exit", lambda: procs.procs["server"].poll() is not None, 120, procs)
    _check_trackers(run_dir)


def _check_trackers(run_dir: Path) -> None:
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rounds = [r for r in records(run_dir, "round") if r["status"] == "aggregated"]
    want_top1 = [(r["round"], r["eval"]["top1"]) for r in rounds]
    want_up = [(r["round"], float(r["bytes_up"])) for r in rounds]
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    assert {"round/top1", "round/bytes_down", "round/bytes_up", "round/round_s", "device/dev0/train_loss",
            "device/dev1/cpu_s"} <= set(acc.Tags()["scalars"])
    assert [(e.step, pytest.approx(e.value)) for e in acc.Scalars("round/top1")] == want_top1
    assert [(e.step, e.value) for e in acc.Scalars("round/bytes_up")] == want_up

    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir.resolve() / 'mlflow' / 'mlflow.db'}")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train_args.comm_round"] == str(ROUNDS) and run.data.params["peft_args.method"] == "bias"
    hist = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "round/bytes_up"))
    assert hist == want_up
    arts = {f.path for f in client.list_artifacts(run_id)}
    assert {"summary.json", "config.yaml", "checkpoint.json", "checkpoints", "report"} <= arts, arts
    assert "report/report.html" in {f.path for f in client.list_artifacts(run_id, "report")}
    ckpt = [f.path for f in client.list_artifacts(run_id, "checkpoints")]
    assert ckpt == [f"checkpoints/round_{ROUNDS:04d}.safetensors"]
