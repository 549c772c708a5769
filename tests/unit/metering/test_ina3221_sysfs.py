"""INA3221 power rails from fake sysfs trees, in the legacy iio (L4T R32) and hwmon (R34+) layouts."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedpeft_edge.errors import MeteringError
from fedpeft_edge.metering.resources import Ina3221Source


def _legacy(root: Path, rails: dict[str, int]) -> Path:
    dev = root / "ina3221x" / "6-0040" / "iio:device0"
    dev.mkdir(parents=True)
    for i, (name, mw) in enumerate(rails.items()):
        (dev / f"rail_name_{i}").write_text(name + "\n")
        (dev / f"in_power{i}_input").write_text(f"{mw}\n")
    return dev


def _hwmon(root: Path, rails: dict[str, tuple[int, int]]) -> Path:
    dev = root / "ina3221" / "1-0040" / "hwmon" / "hwmon3"
    dev.mkdir(parents=True)
    for i, (name, (mv, ma)) in enumerate(rails.items(), start=1):
        (dev / f"in{i}_label").write_text(name + "\n")
        (dev / f"in{i}_input").write_text(f"{mv}\n")
        (dev / f"curr{i}_input").write_text(f"{ma}\n")
    return dev


def test_legacy_nano_rails_integrate(tmp_path: Path) -> None:
    dev = _legacy(tmp_path, {"POM_5V_IN": 3000, "POM_5V_GPU": 0, "POM_5V_CPU": 800})
    src = Ina3221Source(tmp_path)
    src.begin(0.0)
    src.sample(1.0)
    (dev / "in_power0_input").write_text("5000\n")
    out = src.end(2.0)
    assert out["energy_j"] == pytest.approx(3.0 + 0.5 * (3.0 + 5.0), rel=0.01)
    assert out["energy_basis"] == "input rail POM_5V_IN"
    assert out["power_peak_w"] == pytest.approx(5.0)


def test_hwmon_orin_rails_skip_nc(tmp_path: Path) -> None:
    _hwmon(tmp_path, {"VDD_IN": (5000, 1000), "VDD_CPU_GPU_CV": (5000, 200), "NC": (0, 0)})
    src = Ina3221Source(tmp_path)
    assert [r.name for r in src.rails] == ["VDD_IN", "VDD_CPU_GPU_CV"]
    src.begin(0.0)
    out = src.end(10.0)
    assert out["energy_j"] == pytest.approx(50.0, rel=0.01)  # 5 V x 1 A for 10 s
    assert out["energy_rails_j"]["VDD_CPU_GPU_CV"] == pytest.approx(10.0, rel=0.01)


def test_no_rails_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(MeteringError, match="no INA3221 rails"):
        Ina3221Source(tmp_path)
