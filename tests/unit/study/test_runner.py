"""The study runner: resume skips finished runs, redoes half-finished and stale ones, writes the report.

The executor here is a fake (unit tests only): it writes what a server writes into a run directory, so the
runner's bookkeeping is tested without training anything.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from fedpeft_edge.config import dump_config, load_config, load_study_config
from fedpeft_edge.errors import StudyError
from fedpeft_edge.study.executor import MetricsTail, RecordSink
from fedpeft_edge.study.grid import PlannedRun
from fedpeft_edge.study.runner import StudyRunner, run_state


class FakeExecutor:
    """Writes config.yaml, a few round records and summary.json; optionally fails or stops half-way."""

    name = "fake"

    def __init__(self, fail: set[str] | None = None, stop_half_way: set[str] | None = None) -> None:
        self.calls: list[str] = []
        self.fail = fail or set()
        self.stop_half_way = stop_half_way or set()

    def execute(self, run: PlannedRun, config_path: Path, run_dir: Path, log_path: Path,
                on_record: RecordSink, timeout_s: float) -> None:
        self.calls.append(run.run_id)
        cfg = load_config(config_path)
        assert run_dir == Path(cfg.tracking_args.run_dir) / cfg.common_args.run_id
        run_dir.mkdir(parents=True)
        dump_config(cfg, run_dir / "config.yaml")
        lr, seed = cfg.train_args.learning_rate, cfg.common_args.random_seed
        cum = 0
        with (run_dir / "metrics.jsonl").open("w") as fh:
            for rnd in range(1, cfg.train_args.comm_round + 1):
                cum += 1000
                top1 = min(0.99, 0.1 * rnd + lr + 0.01 * seed)
                rec = {"kind": "round", "round": rnd, "status": "aggregated", "accepted": 2, "bytes_up": 600,
                       "bytes_down": 400, "cum_bytes": cum, "round_s": 0.1, "eval": {"top1": top1}}
                fh.write(json.dumps(rec) + "\n")
                on_record(rec)
                if rnd == 1 and lr >= 0.1:
                    div = {"kind": "divergence", "round": 1, "device_id": "device-0", "metric": "train_loss",
                           "value": 3.1, "threshold": 2.3026,
                           "hint": f"learning rate train_args.learning_rate={lr:g} is the likely cause; lower it"}
                    fh.write(json.dumps(div) + "\n")
                    on_record(div)
        if run.run_id in self.fail:
            raise StudyError(f"run {run.run_id}: fake failure")
        if run.run_id in self.stop_half_way:
            return
        (run_dir / "summary.json").write_text(json.dumps({
            "rounds": cfg.train_args.comm_round, "final_top1": top1, "best_top1": top1,
            "bytes_total": cum, "bytes_per_round": 1000.0}))


def _study(tmp_path: Path, rounds: int = 2) -> Path:
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({"train_args": {"comm_round": rounds}, "tracking_args": {"run_dir": "x"}}))
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({
        "name": "s", "base_config": "base.yaml", "study_dir": str(tmp_path / "study"),
        "grid": {"peft_args.method": ["head", "bias"], "train_args.learning_rate": [0.01, 0.1],
                 "common_args.random_seed": [0, 1]}}, sort_keys=False))
    return path


def test_resume_skips_finished_runs_and_redoes_half_finished(tmp_path: Path) -> None:
    study = load_study_config(_study(tmp_path))
    lines: list[str] = []
    half = "method-head_lr-0.01_seed-1"
    first = FakeExecutor(fail={"method-bias_lr-0.1_seed-0"}, stop_half_way={half})
    out = StudyRunner(study, first, progress=lines.append).run(write_report=False)
    assert len(first.calls) == 8 and out.failed.keys() == {"method-bias_lr-0.1_seed-0", half}
    runner = StudyRunner(study, FakeExecutor(), progress=lines.append)
    assert runner.states()[half] == "partial"
    out = runner.run()
    assert sorted(runner.executor.calls) == sorted(["method-bias_lr-0.1_seed-0", half])  # type: ignore[attr-defined]
    assert len(out.skipped) == 6 and not out.failed
    assert set(runner.states().values()) == {"finished"}
    # a third call has nothing left to do
    third = FakeExecutor()
    assert StudyRunner(study, third, progress=lines.append).run(write_report=False).executed == ()
    assert third.calls == []
    assert any("round 2/2: top-1" in line for line in lines)
    assert any("DIVERGENCE round 1 device device-0" in line and "learning_rate=0.1" in line for line in lines)


def test_changed_config_makes_a_finished_run_stale(tmp_path: Path) -> None:
    StudyRunner(load_study_config(_study(tmp_path, rounds=2)), FakeExecutor(), progress=lambda _l: None).run(
        only={"method-head_lr-0.01_seed-0"}, write_report=False)
    changed = load_study_config(_study(tmp_path, rounds=3))
    runner = StudyRunner(changed, FakeExecutor(), progress=lambda _l: None)
    assert runner.states()["method-head_lr-0.01_seed-0"] == "stale"
    runner.run(only={"method-head_lr-0.01_seed-0"}, write_report=False)
    assert runner.states()["method-head_lr-0.01_seed-0"] == "finished"
    assert list((tmp_path / "study" / "runs").glob("method-head_lr-0.01_seed-0.stale-*"))


def test_report_tables_spread_and_flagged_runs(tmp_path: Path) -> None:
    study = load_study_config(_study(tmp_path))
    page = StudyRunner(study, FakeExecutor(), progress=lambda _l: None).run().report
    assert page is not None and page.name == "study_report.html"
    out = page.parent
    for name in ("final_accuracy.csv", "runs.csv", "bytes_per_round.csv", "divergence.csv",
                 "accuracy_vs_round.png", "accuracy_vs_mb.png", "bytes_per_round.png"):
        assert (out / name).is_file(), name
    import csv

    final = {r["group"]: r for r in csv.DictReader((out / "final_accuracy.csv").open())}
    row = final["method=head, lr=0.01"]
    assert row["runs"] == "2" and row["seeds"] == "0 1"
    assert float(row["top1_min"]) == pytest.approx(0.21) and float(row["top1_max"]) == pytest.approx(0.22)
    assert float(row["top1_std"]) == pytest.approx(0.00707, rel=1e-2)
    flagged = list(csv.DictReader((out / "divergence.csv").open()))
    assert {r["run"] for r in flagged} == {f"method-{m}_lr-0.1_seed-{s}" for m in ("head", "bias") for s in (0, 1)}
    assert all(r["learning_rate"] == "0.1" for r in flagged)
    assert "train_args.learning_rate=0.1" in page.read_text()


def test_run_state_needs_summary_and_matching_config(tmp_path: Path) -> None:
    assert run_state(tmp_path / "none", "x") == "new"
    (tmp_path / "r").mkdir()
    assert run_state(tmp_path / "r", "x") == "partial"
    (tmp_path / "r" / "summary.json").write_text("{}")
    (tmp_path / "r" / "config.yaml").write_text("device_args: {renamed_knob: 3}\n")
    assert run_state(tmp_path / "r", "x") == "stale"  # kept aside, not deleted


def test_metrics_tail_waits_for_a_torn_line(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    tail = MetricsTail(path)
    assert tail.read_new() == []
    path.write_text('{"kind": "a"}\n{"kind": "b"')
    assert tail.read_new() == [{"kind": "a"}]
    with path.open("a") as fh:
        fh.write('}\n')
    assert tail.read_new() == [{"kind": "b"}]




def test_cli_lists_the_plan_and_names_a_bad_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fedpeft_edge.cli import main

    path = _study(tmp_path)
    assert main(["study", str(path), "--list"]) == 0
    out = capsys.readouterr().out
    assert "8 runs" in out and "method-bias_lr-0.1_seed-1" in out and "new" in out
    bad = tmp_path / "bad.yaml"
    bad.write_text(path.read_text().replace("train_args.learning_rate", "train_args.learnig_rate"))
    assert main(["study", str(bad), "--list"]) == 2
    assert "'learnig_rate'" in capsys.readouterr().err


def test_a_run_a_sibling_study_finished_is_copied_not_run_again(tmp_path: Path) -> None:
    parent = tmp_path / "studies"
    first = dataclasses.replace(load_study_config(_study(tmp_path)), study_dir=str(parent / "s"))
    StudyRunner(first, FakeExecutor(), progress=lambda _l: None).run(write_report=False)
    # a sibling study in the same parent directory: one run the same experiment as study s's, one new
    sibling = dataclasses.replace(first, name="t", study_dir=str(parent / "t"),
                                  grid={"peft_args.method": ["head"], "train_args.learning_rate": [0.01, 0.5],
                                        "common_args.random_seed": [0]})
    ex = FakeExecutor()
    lines: list[str] = []
    runner = StudyRunner(sibling, ex, progress=lines.append)
    out = runner.run(write_report=False)
    assert ex.calls == ["method-head_lr-0.5_seed-0"]  # the 0.01 run was copied from study s
    assert sorted(out.executed) == ["method-head_lr-0.01_seed-0", "method-head_lr-0.5_seed-0"]
    assert set(runner.states().values()) == {"finished"}
    assert any("reused (copied), not run again" in line for line in lines)
