"""RAPL energy from a fake powercap tree, including a counter wrap-around."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedpeft_edge.errors import MeteringError
from fedpeft_edge.metering.resources import RaplSource

MAX_RANGE = 262_143_328_850


def _zone(root: Path, zid: str, name: str, energy_uj: int) -> Path:
    z = root / f"intel-rapl:{zid}"
    z.mkdir(parents=True, exist_ok=True)
    (z / "name").write_text(name + "\n")
    (z / "max_energy_range_uj").write_text(f"{MAX_RANGE}\n")
    (z / "energy_uj").write_text(f"{energy_uj}\n")
    return z


def _set(zone: Path, energy_uj: int) -> None:
    (zone / "energy_uj").write_text(f"{energy_uj}\n")


def test_wrap_around_and_subzones(tmp_path: Path) -> None:
    pkg = _zone(tmp_path, "0", "package-0", MAX_RANGE - 1_000_000)
    core = _zone(tmp_path, "0:0", "core", 0)  # a sub-zone: part of package-0, never added again
    src = RaplSource(tmp_path)
    assert [z.name for z in src.zones] == ["package-0"]
    src.begin(0.0)
    steps = [(1.0, 2_000_000), (2.0, 7_000_000), (3.0, 7_500_000)]  # wraps between t=0 and t=1
    for t, uj in steps[:-1]:
        _set(pkg, uj)
        _set(core, uj)
        src.sample(t)
    _set(pkg, steps[-1][1])
    out = src.end(steps[-1][0])
    expected_j = (1_000_000 + 2_000_000 + 5_000_000 + 500_000) / 1e6
    assert out["energy_j"] == pytest.approx(expected_j, rel=0.01)
    assert out["power_mean_w"] == pytest.approx(expected_j / 3.0, rel=0.01)
    assert out["power_peak_w"] == pytest.approx(5.0)
    assert out["energy_source"] == "rapl"


def test_psys_is_the_total_when_present(tmp_path: Path) -> None:
    pkg = _zone(tmp_path, "0", "package-0", 0)
    psys = _zone(tmp_path, "1", "psys", 0)
    src = RaplSource(tmp_path)
    src.begin(0.0)
    _set(pkg, 4_000_000)
    _set(psys, 9_000_000)
    out = src.end(1.0)
    assert out["energy_j"] == pytest.approx(9.0)
    assert out["energy_rails_j"] == {"package-0": pytest.approx(4.0), "psys": pytest.approx(9.0)}
    assert out["energy_basis"] == "RAPL psys"


def test_unreadable_counters_mean_not_available(tmp_path: Path) -> None:
    z = _zone(tmp_path, "0", "package-0", 0)
    (z / "energy_uj").unlink()  # as when energy_uj is root-only
    with pytest.raises(MeteringError, match="no readable RAPL zone"):
        RaplSource(tmp_path)
