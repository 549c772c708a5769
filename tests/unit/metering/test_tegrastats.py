"""tegrastats parsing and energy integration, from lines recorded on three Jetson generations."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from fedpeft_edge.errors import MeteringError
from fedpeft_edge.metering.resources import (
    PowerIntegrator,
    ResourceMonitor,
    TegrastatsSource,
    parse_tegrastats_line,
)

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "tegrastats"


def _lines(name: str) -> list[str]:
    return (FIXTURES / name).read_text(encoding="utf-8").splitlines()


# name, rails of line 0 (instantaneous mW), RAM used/total, cores, GPU load of line 1, a temperature
CASES = [
    ("nano_jp461.log", {"POM_5V_IN": 1750, "POM_5V_GPU": 0, "POM_5V_CPU": 366}, (1923, 3964), 4, 0.0,
     ("thermal", 40.0)),
    ("xavier_nx_jp411.log", {"VDD_IN": 6140, "VDD_CPU_GPU_CV": 2706, "VDD_SOC": 1074}, (5246, 7771), 6, 74.0,
     ("thermal", 31.35)),
    ("xavier_nx_jp512.log", {"VDD_IN": 2763, "VDD_CPU_GPU_CV": 650, "VDD_SOC": 650}, (3168, 6851), 6, 63.0,
     ("CPU", 46.5)),
    ("orin_agx_jp511.log", {"VDD_GPU_SOC": 1200, "VDD_CPU_CV": 400, "VIN_SYS_5V0": 2900,
                            "VDDQ_VDD2_1V8AO": 504}, (4722, 30536), 12, 87.0, ("tj", 45.406)),
    ("orin_nano_jp6.log", {"VDD_IN": 4873, "VDD_CPU_GPU_CV": 502, "VDD_SOC": 1455}, (2035, 7620), 6, 96.0,
     ("soc0", 47.531)),
]


@pytest.mark.parametrize(("name", "rails", "ram", "cores", "gpu1", "temp"), CASES)
def test_parse_each_generation(name: str, rails: dict[str, float], ram: tuple[int, int], cores: int,
                               gpu1: float, temp: tuple[str, float]) -> None:
    lines = _lines(name)
    s0 = parse_tegrastats_line(lines[0])
    assert s0.rails_mw == rails  # instantaneous value, never the running average after "/"
    assert (s0.ram_used_mb, s0.ram_total_mb) == ram
    assert len(s0.cpu_loads_pct) == cores
    assert s0.temperatures_c[temp[0]] == temp[1]
    assert parse_tegrastats_line(lines[1]).gpu_load_pct == gpu1


def test_absent_sensors_and_off_cores_are_not_zero() -> None:
    orin = parse_tegrastats_line(_lines("orin_agx_jp511.log")[1])
    assert "CV0" not in orin.temperatures_c and "GPU" in orin.temperatures_c  # -256C = no sensor
    assert "NC" not in orin.rails_mw
    assert orin.cpu_loads_pct[-1] is None and orin.cpu_loads_pct[0] == 58.0
    assert orin.emc_load_pct == 14.0


def test_not_a_tegrastats_line() -> None:
    with pytest.raises(MeteringError, match="not a tegrastats line"):
        parse_tegrastats_line("tegrastats: permission denied")


def _trapezoid(ts: list[float], ws: list[float]) -> float:
    return sum(0.5 * (ws[i] + ws[i - 1]) * (ts[i] - ts[i - 1]) for i in range(1, len(ts)))


@pytest.mark.parametrize(("name", "total_rail"), [("nano_jp461.log", "POM_5V_IN"),
                                                 ("xavier_nx_jp411.log", "VDD_IN"),
                                                 ("orin_nano_jp6.log", "VDD_IN")])
def test_energy_equals_integral_of_samples(name: str, total_rail: str) -> None:
    src = TegrastatsSource(command=["unused"])
    lines = _lines(name) * 20  # 20 passes over the recording, one line every 0.1 s
    ts = [0.1 * i for i in range(len(lines))]
    for line, t in zip(lines, ts, strict=True):
        src.feed(line, t)
    out = src.end(ts[-1])
    watts = [parse_tegrastats_line(x).rails_mw[total_rail] / 1000.0 for x in lines]
    expected = _trapezoid(ts, watts)
    assert out["energy_j"] == pytest.approx(expected, rel=0.01)
    assert out["energy_basis"] == f"input rail {total_rail}"
    assert out["power_mean_w"] == pytest.approx(expected / ts[-1], rel=0.01)


def test_orin_agx_without_input_rail_sums_measured_rails() -> None:
    src = TegrastatsSource(command=["unused"])
    lines = _lines("orin_agx_jp511.log")
    for i, line in enumerate(lines):
        src.feed(line, float(i))
    out = src.end(float(len(lines) - 1))
    totals = [sum(parse_tegrastats_line(x).rails_mw.values()) / 1000.0 for x in lines]
    assert out["energy_j"] == pytest.approx(_trapezoid([0.0, 1.0, 2.0], totals), rel=0.01)
    assert out["energy_basis"].startswith("sum of measured rails")
    assert out["gpu_load_mean_pct"] == pytest.approx((0 + 87 + 91) / 3)


def test_constant_power_integrates_to_power_times_time() -> None:
    integ = PowerIntegrator()
    for i in range(101):
        integ.add(i * 0.1, {"VDD_IN": 5.0})
    assert integ.joules["VDD_IN"] == pytest.approx(50.0, rel=1e-9)


def test_monitor_runs_a_replayed_tegrastats_process(tmp_path: Path) -> None:
    replay = ("import sys,time\n"
              "for line in open(sys.argv[1]).read().splitlines()*100:\n"
              "    print(line, flush=True); time.sleep(0.02)\n")
    src = TegrastatsSource(command=[sys.executable, "-c", replay, str(FIXTURES / "xavier_nx_jp411.log")])
    monitor = ResourceMonitor(0.05, src)
    with monitor.measure() as m:
        import time

        time.sleep(1.0)
    summary = m.summary()
    assert summary["energy_source"] == "tegrastats"
    assert 6.0 < summary["power_mean_w"] < 8.3  # between the recorded VDD_IN extremes
    assert summary["energy_j"] > 0 and summary["gpu_load_mean_pct"] is not None
    assert src.bad_lines == 0
