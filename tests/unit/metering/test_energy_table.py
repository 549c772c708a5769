"""The report's energy table: per round, per trained sample and per MB sent, by hand; absent sensors stay None."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedpeft_edge.metering.energy import energy_rows, samples_trained


def _rec(device: str, rnd: int, energy: float | None, bytes_up: int, rate: float, train_s: float,
         wall_s: float, **res: object) -> dict[str, object]:
    resources = {"energy_j": energy, "energy_source": "tegrastats" if energy is not None else None,
                 "energy_basis": "input rail VDD_IN" if energy is not None else None, "wall_s": wall_s, **res}
    return {"kind": "device_round", "round": rnd, "device_id": device, "status": "accepted", "bytes_up": bytes_up,
            "images_per_s": rate, "train_s": train_s, "resources": resources}


def test_energy_per_round_sample_and_mb_by_hand() -> None:
    recs = [_rec("orin", 1, 120.0, 2_000_000, 50.0, 4.0, 5.0), _rec("orin", 2, 80.0, 2_000_000, 40.0, 5.0, 5.0),
            _rec("laptop", 1, None, 1_000_000, 100.0, 1.0, 1.0), _rec("laptop", 2, None, 1_000_000, 100.0, 1.0, 1.0)]
    rows = {r["device_id"]: r for r in energy_rows(recs, "run1")}
    orin = rows["orin"]
    assert orin["energy_j_total"] == 200.0 and orin["j_per_round"] == 100.0
    assert orin["samples_trained"] == 400  # 50/s * 4 s + 40/s * 5 s
    assert orin["j_per_sample"] == pytest.approx(0.5)
    assert orin["mb_sent"] == pytest.approx(4.0) and orin["j_per_mb_sent"] == pytest.approx(50.0)
    assert orin["power_mean_w"] == pytest.approx(20.0)  # 200 J over 10 s of measured training
    assert orin["energy_basis"] == "input rail VDD_IN" and orin["rounds_measured"] == 2
    laptop = rows["laptop"]  # no sensor: every energy figure is "not available", never 0
    assert laptop["rounds"] == 2 and laptop["rounds_measured"] == 0
    for key in ("energy_j_total", "j_per_round", "j_per_sample", "j_per_mb_sent", "power_mean_w", "energy_source"):
        assert laptop[key] is None


def test_samples_seen_wins_and_gpu_energy_is_summed() -> None:
    assert samples_trained({"samples_seen": 96, "images_per_s": 1.0, "train_s": 1.0}) == 96
    assert samples_trained({"images_per_s": None, "train_s": 2.0}) is None
    rows = energy_rows([_rec("gpu", 1, 30.0, 500_000, 10.0, 1.0, 1.0, gpu_energy_j=12.5),
                        _rec("gpu", 2, 30.0, 500_000, 10.0, 1.0, 1.0, gpu_energy_j=7.5)])
    assert rows[0]["gpu_energy_j_total"] == 20.0 and rows[0]["j_per_mb_sent"] == pytest.approx(60.0)


def test_report_writes_the_energy_table(tmp_path: Path) -> None:
    from fedpeft_edge.report import write_report

    run = tmp_path / "runs" / "r1"
    run.mkdir(parents=True)
    lines = [{"kind": "round", "round": 1, "status": "aggregated"},
             _rec("orin", 1, 120.0, 2_000_000, 50.0, 4.0, 5.0)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    files = write_report([run], tmp_path / "out")
    csv = files.csvs["energy"].read_text().splitlines()
    assert csv[0].startswith("run,device_id,energy_source") and ",orin," in csv[1]
    assert "Table: energy" in files.html.read_text()
