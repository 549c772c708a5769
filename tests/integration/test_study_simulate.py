"""A real study through `fedpeft-edge simulate`: a diverging rate is flagged in its run's records, in the
study's progress and in its report; a second call skips the finished runs. Tiny random-init ViT on digits."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import yaml
from fl_processes import write_config

from fedpeft_edge.config import load_study_config
from fedpeft_edge.server.runlog import read_metrics
from fedpeft_edge.study.executor import SimulateExecutor
from fedpeft_edge.study.runner import StudyRunner

pytestmark = [pytest.mark.integration]

# Bias-tuning the tiny ViT at this SGD rate (gradients clipped at norm 1, so the loss stays finite) drives the
# devices' training loss to 17-29 by round 1-2, far above chance (ln 10 = 2.30); at 0.05 it stays below.
DIVERGING_LR = 5.0


def test_diverging_rate_is_flagged_and_resume_skips(tmp_path: Path) -> None:
    base = write_config(tmp_path / "base.yaml", 1883, "unused",
                        train_args={"comm_round": 2, "min_updates": 2, "grad_clip_norm": 1.0,
                                    "round_timeout_s": 20})
    study_file = tmp_path / "study.yaml"
    study_file.write_text(yaml.safe_dump({
        "name": "diverge", "base_config": str(base), "study_dir": str(tmp_path / "study"),
        "run_timeout_s": 240, "grid": {"train_args.learning_rate": [0.05, DIVERGING_LR]}}))
    study = load_study_config(study_file)
    lines: list[str] = []
    out = StudyRunner(study, SimulateExecutor(), progress=lines.append).run()
    assert not out.failed, out.failed
    runs = tmp_path / "study" / "runs"
    flagged = read_metrics(runs / f"lr-{DIVERGING_LR:g}", "divergence")
    assert flagged, "the diverging run wrote no divergence record"
    assert all(f"learning_rate={DIVERGING_LR:g}" in str(rec.get("hint")) for rec in flagged)
    assert max(float(rec["value"]) for rec in flagged if rec.get("metric") == "train_loss_end") > 10.0
    assert max(float(rec["value"]) for rec in flagged if rec.get("metric") == "eval_loss") > 10.0
    # the random-init model starts at chance (ln 10 = 2.30) and, in 2 rounds at a sane rate, stays there (top-1
    # 9%): its flags, if any, name losses just around chance, never the diverging run's tens
    control = read_metrics(runs / "lr-0.05", "divergence")
    assert all(rec.get("metric") in ("train_loss_end", "eval_loss") and float(rec["value"]) < 3.0
               for rec in control), control
    assert any("DIVERGENCE" in line and f"lr-{DIVERGING_LR:g}" in line for line in lines)
    assert out.report is not None
    table = list(csv.DictReader((out.report.parent / "divergence.csv").open()))
    assert {float(r["learning_rate"]) for r in table if r["run"] == f"lr-{DIVERGING_LR:g}"} == {DIVERGING_LR}
    again = StudyRunner(study, SimulateExecutor(), progress=lines.append).run(write_report=False)
    assert again.executed == () and len(again.skipped) == 2
