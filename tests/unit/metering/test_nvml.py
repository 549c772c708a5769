"""NVML power and energy of a discrete GPU: the driver's energy counter, the power-integral fallback, and
"not available" (None, never 0) when nvidia-ml-py or the driver is absent."""

from __future__ import annotations

import sys
import types
from typing import Any

import pytest

from fedpeft_edge.errors import MeteringError
from fedpeft_edge.metering.resources import SUMMARY_KEYS, NvmlSource, ResourceMonitor, load_nvml


class FakeNvml:
    """The handful of pynvml calls NvmlSource makes, answering with a scripted board."""

    def __init__(self, power_mw: list[float], energy_mj: list[float] | None) -> None:
        self.power_mw = list(power_mw)
        self.energy_mj = None if energy_mj is None else list(energy_mj)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> Any:  # noqa: N802 - pynvml's names
        if index != 0:
            raise RuntimeError("NVML_ERROR_INVALID_ARGUMENT")
        return "handle0"

    def nvmlDeviceGetTotalEnergyConsumption(self, _handle: Any) -> float:  # noqa: N802
        if self.energy_mj is None:
            raise RuntimeError("NVML_ERROR_NOT_SUPPORTED")
        return self.energy_mj.pop(0) if len(self.energy_mj) > 1 else self.energy_mj[0]

    def nvmlDeviceGetPowerUsage(self, _handle: Any) -> float:  # noqa: N802
        return self.power_mw.pop(0) if len(self.power_mw) > 1 else self.power_mw[0]


def test_energy_counter_is_preferred() -> None:
    # probe at construction, then begin and end: 1_000_000 mJ -> 1_250_000 mJ = 250 J over 10 s
    fake = FakeNvml([100_000.0, 150_000.0], [1_000_000.0, 1_000_000.0, 1_250_000.0])
    src = NvmlSource(0, nvml=fake)
    assert src.has_counter
    src.begin(0.0)
    out = src.end(10.0)
    assert out["energy_j"] == pytest.approx(250.0)
    assert out["power_mean_w"] == pytest.approx(25.0)
    assert out["energy_basis"] == "NVML energy counter of GPU 0"
    assert out["gpu_energy_j"] == pytest.approx(250.0)


def test_power_readings_integrate_without_a_counter() -> None:
    fake = FakeNvml([60_000.0, 60_000.0, 120_000.0, 120_000.0], None)
    src = NvmlSource(0, nvml=fake)
    assert not src.has_counter
    src.begin(0.0)  # 60 W
    src.sample(1.0)  # 60 W
    src.sample(2.0)  # 120 W
    out = src.end(3.0)  # 120 W: 60 + 90 + 120 = 270 J
    assert out["energy_j"] == pytest.approx(270.0)
    assert out["energy_basis"].startswith("NVML power readings")
    assert out["power_peak_w"] == pytest.approx(120.0)


def test_missing_gpu_index_is_an_error() -> None:
    with pytest.raises(MeteringError, match="NVML has no GPU 3"):
        NvmlSource(3, nvml=FakeNvml([1.0], None))


def test_absent_library_is_not_available(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml -> ImportError
    with pytest.raises(MeteringError, match="nvidia-ml-py is not installed"):
        load_nvml()
    broken = types.ModuleType("pynvml")

    def no_driver() -> None:
        raise RuntimeError("NVML Shared Library Not Found")

    broken.nvmlInit = no_driver  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pynvml", broken)
    with pytest.raises(MeteringError, match="no NVIDIA driver"):
        load_nvml()


def test_monitor_keeps_gpu_figures_beside_the_owner_of_energy() -> None:
    monitor = ResourceMonitor(0.05, NvmlSource(0, nvml=FakeNvml([50_000.0], None)))
    with monitor.measure() as m:
        pass
    summary = m.summary()
    assert set(SUMMARY_KEYS) == set(summary)
    assert summary["energy_source"] == "nvml" and summary["gpu_power_mean_w"] == pytest.approx(50.0)
    assert summary["battery_pct_start"] is None  # sensors not in the monitor stay None, never 0
