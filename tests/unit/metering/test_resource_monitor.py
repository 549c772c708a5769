"""ResourceMonitor on this machine: real psutil figures, and "not available" (None) for absent sensors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from fedpeft_edge.errors import MeteringError
from fedpeft_edge.metering.resources import SUMMARY_KEYS, ResourceMonitor, find_rapl_zones


def _train_tiny_mlp(steps: int = 400) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(256, 64), torch.randint(0, 10, (256,))
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def test_a_round_on_this_machine() -> None:
    torch.set_num_threads(1)
    monitor = ResourceMonitor(0.05)
    with monitor.measure() as m:
        _train_tiny_mlp()
    s = m.summary()
    assert set(s) == set(SUMMARY_KEYS)
    json.dumps(s)  # JSON-able as sent to the server
    assert s["wall_s"] > 0 and s["cpu_s"] > 0 and 0 < s["cpu_util_pct"] < 100 * (torch.get_num_threads() + 2)
    assert 10 < s["rss_mean_mb"] <= s["rss_peak_mb"] < 100_000
    assert 0 < s["sys_mem_used_peak_mb"] <= s["sys_mem_total_mb"]
    assert s["samples"] >= 1
    if not torch.cuda.is_available():
        assert s["gpu_mem_peak_allocated_mb"] is None and s["gpu_mem_peak_reserved_mb"] is None
    if not find_rapl_zones() and not Path("/usr/bin/tegrastats").exists():
        assert s["energy_j"] is None and s["power_mean_w"] is None and s["energy_source"] is None


class _FakeSource:
    name = "fake"

    def __init__(self, fail: bool = False) -> None:
        self.samples: list[float] = []
        self.fail = fail

    def begin(self, t: float) -> None:
        self.samples = []

    def sample(self, t: float) -> None:
        if self.fail:
            raise OSError("sensor unplugged")
        self.samples.append(t)

    def end(self, t: float) -> dict[str, Any]:
        return {"energy_j": 1.5, "energy_source": "fake", "power_mean_w": None}


def test_injected_sources_and_the_first_energy_source_wins() -> None:
    first, second = _FakeSource(), _FakeSource()
    with ResourceMonitor(0.01, first, second).measure() as m:
        import time

        time.sleep(0.1)
    s = m.summary()
    assert s["energy_j"] == 1.5 and s["wall_s"] is None  # no process source injected: not measured
    assert len(first.samples) >= 3 and s["samples"] >= 3


def test_a_failing_sensor_does_not_break_the_round() -> None:
    with ResourceMonitor(0.01, _FakeSource(fail=True)).measure() as m:
        import time

        time.sleep(0.05)
    assert m.summary()["energy_j"] == 1.5


def test_summary_inside_the_block_and_bad_interval_are_errors() -> None:
    with pytest.raises(MeteringError, match="interval_s must be > 0"):
        ResourceMonitor(0.0)
    with ResourceMonitor(0.01, _FakeSource()).measure() as m, pytest.raises(MeteringError, match="after"):
        m.summary()


def test_thermal_sensors_are_read_at_most_once_per_period_across_windows(monkeypatch: pytest.MonkeyPatch) -> None:
    from fedpeft_edge.metering import resources

    reads: list[int] = []
    monkeypatch.setattr(resources, "_temperatures", lambda: reads.append(1) or {"cpu/0": 40.0 + len(reads)})
    clock = iter([0.0, 0.001, 0.002, 0.003, 1.5, 1.6]).__next__
    monitor = ResourceMonitor(10.0, resources.ThermalSource(min_period_s=1.0), clock=clock)
    summaries = []
    for _ in range(3):  # windows of 1 ms, the first two within the period, the third 1.5 s later
        with monitor.measure() as m:
            pass
        summaries.append(m.summary())
    assert len(reads) == 2
    assert [s["temperatures_max_c"] for s in summaries] == [{"cpu/0": 41.0}, {"cpu/0": 41.0}, {"cpu/0": 42.0}]
