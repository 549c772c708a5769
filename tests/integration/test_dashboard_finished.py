"""A finished run in real headless Chromium: its devices show offline (the last presence said online, but the
run is over) and the accuracy charts span 0-100% (they once ran to 150%)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from brokers import free_port
from browser import start_chromium

from fedpeft_edge.dashboard.server import DashboardServer, load_runs

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(120)]

T0 = 1_700_000_000.0


def _finished_run(root: Path, perplexity: bool = False) -> Path:
    run_dir = root / "done"
    run_dir.mkdir(parents=True)
    recs = [{"kind": "join", "time": T0, "device_id": "dev0", "accepted": True, "num_samples": 90}]
    for r in (1, 2):
        recs.append({"kind": "round", "time": T0 + 10 * r, "round": r, "attempt": 0, "status": "aggregated",
                     "selected": ["dev0"], "accepted": 1, "dropped": {}, "bytes_down": 1000, "bytes_up": 1000,
                     "cum_bytes": 2000 * r, "round_s": 5.0, "eval": {"top1": 0.3 * r, "loss": 1.0, "samples": 10,
                                                             **({"perplexity": 90.0 - 10 * r} if perplexity else {})},
                     "devices_online": 1})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (run_dir / "summary.json").write_text(json.dumps({"rounds": 2, "end_reason": "completed"}))
    return run_dir


def _read_page(tmp_path: Path, run_dir: Path, script: str) -> Any:
    """The dashboard of `run_dir` in headless Chromium: what `script` returns once it returns something (None
    if it never does within 60 s)."""
    server = DashboardServer(load_runs([run_dir]), "127.0.0.1", free_port(), None).start()
    driver = start_chromium(tmp_path / "chromium-profile")
    try:
        driver.set_page_load_timeout(60)
        driver.get(server.url)
        deadline, page = time.monotonic() + 60, None
        while page is None and time.monotonic() < deadline:
            page = driver.execute_script(script)
            time.sleep(0.2)
    finally:
        driver.quit()
        server.stop()
    return page


_READ = """
const v = views[0];
if (!v || !v.state || !v.charts['acc-round']) return null;
const y = v.charts['acc-round'].u.scales.y;
return {finished: v.state.run.finished, online: Object.values(v.state.devices).map(d => d.online),
        label: document.querySelector('table.devices tbody tr').textContent, ymin: y.min, ymax: y.max};
"""


def test_a_finished_run_shows_its_devices_offline_and_accuracy_on_0_to_100(tmp_path: Path) -> None:
    page = _read_page(tmp_path, _finished_run(tmp_path), _READ)
    assert page is not None, "the page never drew its accuracy chart"
    assert page["finished"] and page["online"] == [False] and "offline" in page["label"]
    assert (page["ymin"], page["ymax"]) == (0, 100)


_READ_PPL = """
const v = views[0];
if (!v || !v.state || !v.charts['acc-round']) return null;
const card = document.querySelector('.ppl-card'), kpi = document.querySelector('.ppl-kpi');
const c = v.charts['ppl-round'];
return {card: !card.hidden, kpi: !kpi.hidden, value: document.querySelector('.ppl').textContent,
        series: c ? Array.from(c.u.data[1]) : null};
"""


@pytest.mark.parametrize("causal_lm", [True, False])
def test_a_causal_lm_run_shows_its_perplexity_and_a_classifier_run_does_not(tmp_path: Path, causal_lm: bool) -> None:
    page = _read_page(tmp_path, _finished_run(tmp_path, perplexity=causal_lm), _READ_PPL)
    assert page is not None, "the page never drew its accuracy chart"
    if causal_lm:
        assert page["card"] and page["kpi"] and page["value"] == "70.00"
        assert page["series"] == [80.0, 70.0]
    else:
        assert not page["card"] and not page["kpi"] and page["series"] is None
