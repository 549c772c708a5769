"""tegrastats parsing and energy integration for every Jetson family: Nano, TX2, Xavier NX, Orin Nano/NX
(JetPack 5 and 6), AGX Orin (JetPack 5 two-value rails and JetPack 6 instant/average/max rails)."""

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
    ("tx2_jp462.log", {"VDD_SYS_GPU": 152, "VDD_SYS_SOC": 533, "VDD_4V0_WIFI": 0, "VDD_IN": 2047,
                       "VDD_SYS_CPU": 152, "VDD_SYS_DDR": 230}, (1587, 7851), 6, 0.0, ("Tdiode", 29.75)),
    ("orin_agx_jp6.log", {"VDD_GPU_SOC": 5139, "VDD_CPU_CV": 3268, "VIN_SYS_5V0": 5500,
                          "VDDQ_VDD2_1V8AO": 1509}, (5811, 62841), 12, 88.0, ("tj", 44.875)),
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
                                                 ("tx2_jp462.log", "VDD_IN"),
                                                 ("xavier_nx_jp411.log", "VDD_IN"),
                                                 ("xavier_nx_jp512.log", "VDD_IN"),
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


AGX_SUPPLIES = ("VDD_GPU_SOC", "VDD_CPU_CV", "VIN_SYS_5V0")


@pytest.mark.parametrize("name", ["orin_agx_jp511.log", "orin_agx_jp6.log"])
def test_orin_agx_total_is_its_three_module_supplies(name: str) -> None:
    src = TegrastatsSource(command=["unused"])
    lines = _lines(name)
    for i, line in enumerate(lines):
        src.feed(line, float(i))
    out = src.end(float(len(lines) - 1))
    totals = [sum(parse_tegrastats_line(x).rails_mw[r] for r in AGX_SUPPLIES) / 1000.0 for x in lines]
    assert out["energy_j"] == pytest.approx(_trapezoid([0.0, 1.0, 2.0], totals), rel=1e-9)
    assert out["energy_basis"] == "module supplies VDD_GPU_SOC+VDD_CPU_CV+VIN_SYS_5V0"  # 1V8AO left out
    assert out["power_peak_w"] == pytest.approx(max(totals))
    assert set(out["energy_rails_j"]) == {*AGX_SUPPLIES, "VDDQ_VDD2_1V8AO"}


def test_agx_orin_jp6_by_hand() -> None:
    """Three AGX Orin JetPack 6 lines 1 s apart; module supplies 13907, 26523 and 27370 mW (instant values).
    Trapezoids: (13.907 + 26.523) / 2 + (26.523 + 27.370) / 2 = 20.215 + 26.9465 = 47.1615 J."""
    src = TegrastatsSource(command=["unused"])
    for i, line in enumerate(_lines("orin_agx_jp6.log")):
        src.feed(line, float(i))
    out = src.end(2.0)
    assert out["energy_j"] == pytest.approx(47.1615, abs=1e-9)
    assert out["power_mean_w"] == pytest.approx(47.1615 / 2.0)


def test_agx_xavier_rails_without_a_rule_are_summed() -> None:
    line = ("RAM 2631/15823MB (lfb 2920x4MB) SWAP 0/7911MB (cached 0MB) CPU [4%@1190,3%@1190,2%@1190,1%@1190,"
            "off,off,off,off] EMC_FREQ 0%@2133 GR3D_FREQ 0%@1377 APE 150 MTS fg 0% bg 0% AO@29C GPU@30C "
            "Tdiode@32.75C PMIC@100C AUX@29C CPU@31C thermal@30.25C Tboard@30C GPU 155/155 CPU 311/311 "
            "SOC 1088/1088 CV 0/0 VDDRQ 155/155 SYS5V 1962/1962")
    s = parse_tegrastats_line(line)
    assert s.rails_mw == {"GPU": 155, "CPU": 311, "SOC": 1088, "CV": 0, "VDDRQ": 155, "SYS5V": 1962}
    src = TegrastatsSource(command=["unused"])
    src.feed(line, 0.0)
    src.feed(line, 2.0)
    out = src.end(2.0)
    assert out["energy_j"] == pytest.approx(2 * 3.671)
    assert out["energy_basis"].startswith("sum of measured rails")


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
