"""`fedpeft-edge report` on two realistic run directories (bias and full): files, plots, CSV numbers."""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fedpeft_edge.cli import report as report_cli
from fedpeft_edge.config import RunConfig, dump_config, replace_in
from fedpeft_edge.errors import CheckpointError
from fedpeft_edge.report import NOT_AVAILABLE, write_report

DEVICES = ("dev-0", "dev-1", "dev-2")


def _resources(i: int, rnd: int, energy: bool) -> dict[str, Any]:
    return {
        "wall_s": 3.0 + i, "cpu_s": 2.5 + i, "cpu_util_pct": 80.0, "rss_mean_mb": 400.0 + i,
        "rss_peak_mb": 450.0 + 10 * i + rnd,
        "gpu_mem_peak_allocated_mb": None, "gpu_mem_peak_reserved_mb": None,
        "energy_j": 12.5 + i if energy else None, "energy_source": "tegrastats" if energy else None,
        "power_mean_w": 4.1 if energy else None, "net_bytes_sent": 1000 + rnd, "net_bytes_recv": 2000 + rnd,
    }


def make_run_dir(root: Path, method: str, update_bytes: int, rounds: int = 3, dp: bool = False) -> Path:
    """A run directory as the server writes it (docs/design.md): config.yaml, metrics.jsonl, summary.json."""
    run = root / f"run-{method}"
    run.mkdir(parents=True)
    dump_config(replace_in(RunConfig(), **{"peft_args.method": method, "common_args.run_id": run.name}),
                run / "config.yaml")
    recs: list[dict[str, Any]] = []
    for i, dev in enumerate(DEVICES):
        recs.append({"kind": "join", "device_id": dev, "accepted": True, "reason": None, "time": 1.0 + i,
                     "profile": {"hostname": f"jetson-{i}", "cpu_model": "ARMv8", "ram_total_mb": 3964.0,
                                 "accelerator": "cpu:ARMv8", "device_model": "NVIDIA Jetson Nano",
                                 "jetson": True, "l4t_version": "32.7.1"},
                     "data_stats": {"num_train": 100 + i, "num_test": 25, "label_hist": [10] * 10}})
    recs.append({**recs[1], "time": 9.0})  # device 1 re-joins (reconnect): one device row, its last join
    cum = 0
    for rnd in range(1, rounds + 1):
        up = down = 0
        for i, dev in enumerate(DEVICES):
            dropped = rnd == 2 and i == 2
            b_down, b_up = update_bytes + 311 * i, 0 if dropped else update_bytes + 97 * i + rnd
            up, down = up + b_up, down + b_down
            recs.append({
                "kind": "device_round", "round": rnd, "device_id": dev,
                "status": "dropped" if dropped else "accepted", "drop_reason": "late" if dropped else None,
                "num_samples": 100 + i, "bytes_down": b_down, "bytes_up": b_up, "download_s": 0.2 + 0.01 * i,
                "train_s": 3.0 + i, "upload_s": 0.3, "train_loss": 2.0 / rnd, "train_acc": 0.3 + 0.1 * rnd,
                "epsilon": 0.5 * rnd + 0.1 * i if dp else None,
                "resources": _resources(i, rnd, energy=i == 0),
                "time": 100.0 * rnd + i})
        cum += up + down
        recs.append({"kind": "round", "round": rnd, "selected": list(DEVICES),
                     "accepted": 2 if rnd == 2 else 3,
                     "dropped": {"late": 1} if rnd == 2 else {}, "bytes_down": down, "bytes_up": up,
                     "cum_bytes": cum, "round_s": 6.5 + rnd, "aggregate_s": 0.05,
                     "eval": {"loss": 2.1 / rnd, "top1": 0.2 + 0.15 * rnd + (0.05 if method == "full" else 0),
                              "samples": 500},
                     "devices_online": 3, "time": 100.0 * rnd + 9})
    lines = [json.dumps(r) for r in recs]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n" + '{"kind": "round", "rou', encoding="utf-8")
    (run / "summary.json").write_text(json.dumps({"rounds": rounds, "final_top1": recs[-1]["eval"]["top1"]}))
    return run


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _jsonl(run: Path, kind: str) -> list[dict[str, Any]]:
    out = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec["kind"] == kind:
            out.append(rec)
    return out


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("runs")
    bias = make_run_dir(root, "bias", update_bytes=21_000)
    full = make_run_dir(root, "full", update_bytes=16_000_000, dp=True)
    out = root / "report"
    write_report([bias, full], out)
    return bias, full, out


def test_files_exist(two_runs: tuple[Path, Path, Path]) -> None:
    _, _, out = two_runs
    for name in ("report.html", "accuracy_vs_round.png", "accuracy_vs_mb.png", "bytes_per_device.png",
                 "round_time.png", "device_resources.png", "epsilon.png", "rounds.csv", "devices.csv",
                 "device_rounds.csv"):
        assert (out / name).stat().st_size > 100, name
    assert (out / "accuracy_vs_mb.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_html_is_self_contained_and_says_not_available(two_runs: tuple[Path, Path, Path]) -> None:
    page = (two_runs[2] / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 6
    assert "<img" in page and 'src="http' not in page and "src='http" not in page
    assert NOT_AVAILABLE in page  # GPU memory and energy of devices 1 and 2


def test_round_csv_equals_metrics(two_runs: tuple[Path, Path, Path]) -> None:
    bias, full, out = two_runs
    rows = _csv(out / "rounds.csv")
    expected = [(run.name, r) for run in (bias, full) for r in _jsonl(run, "round")]
    assert len(rows) == len(expected) == 6  # the torn last line is skipped
    for row, (name, rec) in zip(rows, expected, strict=True):
        assert row["run"] == name and int(row["round"]) == rec["round"]
        assert float(row["top1"]) == rec["eval"]["top1"] and float(row["loss"]) == rec["eval"]["loss"]
        assert int(row["cum_bytes"]) == rec["cum_bytes"] and int(row["bytes_up"]) == rec["bytes_up"]
        assert float(row["cum_mb"]) == rec["cum_bytes"] / 1e6
        assert float(row["round_s"]) == rec["round_s"]
    assert {r["method"] for r in rows} == {"bias", "full"}


def test_device_round_csv_equals_metrics(two_runs: tuple[Path, Path, Path]) -> None:
    bias, full, out = two_runs
    rows = _csv(out / "device_rounds.csv")
    expected = [r for run in (bias, full) for r in _jsonl(run, "device_round")]
    assert len(rows) == len(expected) == 18
    for row, rec in zip(rows, expected, strict=True):
        assert (row["device_id"], int(row["round"])) == (rec["device_id"], rec["round"])
        assert int(row["bytes_up"]) == rec["bytes_up"] and int(row["bytes_down"]) == rec["bytes_down"]
        assert float(row["train_s"]) == rec["train_s"]
        assert float(row["rss_peak_mb"]) == rec["resources"]["rss_peak_mb"]
        energy = rec["resources"]["energy_j"]
        assert row["energy_j"] == ("" if energy is None else str(energy))
        assert row["gpu_mem_peak_reserved_mb"] == ""  # not measured: empty, never 0
        eps = rec["epsilon"]
        assert row["epsilon"] == ("" if eps is None else str(eps))


def test_devices_csv_totals(two_runs: tuple[Path, Path, Path]) -> None:
    bias, _, out = two_runs
    rows = [r for r in _csv(out / "devices.csv") if r["run"] == bias.name]
    recs = _jsonl(bias, "device_round")
    for row in rows:
        mine = [r for r in recs if r["device_id"] == row["device_id"]]
        assert int(row["bytes_up_total"]) == sum(r["bytes_up"] for r in mine)
        assert float(row["rss_peak_mb"]) == max(r["resources"]["rss_peak_mb"] for r in mine)
    assert [r["device_id"] for r in rows] == list(DEVICES)
    assert [r["energy_j_total"] for r in rows] == ["37.5", "", ""]


def test_cli_subprocess_default_out(tmp_path: Path) -> None:
    run = make_run_dir(tmp_path, "bias", update_bytes=21_000)
    entry = "import sys; from fedpeft_edge.cli import main; sys.exit(main())"
    proc = subprocess.run([sys.executable, "-c", entry, "report", str(run)], capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert (run / "report" / "report.html").is_file() and "report.html" in proc.stdout
    assert not (run / "report" / "epsilon.png").exists()  # no DP in this run


def test_cli_run_and_missing_run_dir(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    report_cli.add_arguments(parser)
    with pytest.raises(CheckpointError, match="no metrics.jsonl"):
        report_cli.run(parser.parse_args([str(tmp_path / "nope")]))


def test_divergence_records_are_listed_with_the_rate(tmp_path: Path) -> None:
    run = make_run_dir(tmp_path, "bias", 40_000)
    with (run / "metrics.jsonl").open("a") as fh:  # after the fixture's torn last line
        fh.write("\n" + json.dumps({"kind": "divergence", "round": 1, "device_id": "dev-2", "metric": "train_loss",
                                    "value": 2.92, "threshold": 2.3026, "hint": "learning rate "
                                    "train_args.learning_rate=0.03 is the likely cause; lower it"}) + "\n")
    dump_config(replace_in(RunConfig(), **{"train_args.learning_rate": 0.03}), run / "config.yaml")
    files = write_report([run], tmp_path / "out")
    rows = list(csv.DictReader(files.csvs["divergence"].open()))
    assert [(r["round"], r["device_id"], r["learning_rate"]) for r in rows] == [("1", "dev-2", "0.03")]
    assert "train_loss 2.92 (chance-level threshold 2.303)" in rows[0]["flag"]
    assert "learning_rate=0.03" in files.html.read_text()


def test_devices_csv_names_the_lora_rank_given_and_why(tmp_path: Path) -> None:
    run = make_run_dir(tmp_path, "lora", 5000, rounds=1)
    with (run / "metrics.jsonl").open("a", encoding="utf-8") as fh:
        for rec in ({"kind": "assignment", "device_id": "dev-0", "after_round": None, "rank": 4, "reason": "memory"},
                    {"kind": "assignment", "device_id": "dev-0", "after_round": 1, "rank": 2, "reason": "deadline"}):
            fh.write(json.dumps(rec) + "\n")
    out = tmp_path / "report"
    write_report([run], out)
    rows = {r["device_id"]: r for r in _csv(out / "devices.csv")}
    assert (rows["dev-0"]["rank"], rows["dev-0"]["rank_reason"]) == ("2", "deadline")  # the latest assignment
    assert rows["dev-1"]["rank"] == ""
