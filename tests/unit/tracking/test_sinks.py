"""Tracking sinks fed by a real RunLog, read back with TensorBoard's own reader and MlflowClient."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fedpeft_edge.config import config_from_dict, dump_config
from fedpeft_edge.server.runlog import RunLog
from fedpeft_edge.tracking import attach_trackers
from fedpeft_edge.tracking.scalars import ScalarFolder


def _cfg(run_dir: Path, **tracking: Any) -> Any:
    return config_from_dict({"common_args": {"run_id": "trk"}, "train_args": {"comm_round": 2, "learning_rate": 0.05},
                             "tracking_args": {"run_dir": str(run_dir.parent), **tracking}})


def _write_run(runlog: RunLog) -> None:
    """Two rounds as the server writes them (round 2 needed a retry: its failed attempt logs nothing)."""
    for rnd, attempts in ((1, [1]), (2, [1, 2])):
        for att in attempts:
            ok = att == attempts[-1]
            for dev, eps in (("dev0", 0.5 * rnd), ("dev1", 0.25 * rnd)):
                runlog.write("device_round", round=rnd, attempt=att, device_id=dev,
                             status="accepted" if ok else "dropped", drop_reason=None if ok else "deadline",
                             bytes_down=1000 * rnd, bytes_up=1100 * rnd, train_loss=2.0 / rnd, train_acc=0.3 * rnd,
                             epsilon=eps, train_s=0.5, resources={"cpu_s": 0.4 * rnd, "rss_peak_mb": 500.0,
                                                                  "energy_j": None})
            runlog.write("round", round=rnd, attempt=att, status="aggregated" if ok else "failed",
                         selected=["dev0", "dev1"], accepted=2 if ok else 0, dropped={} if ok else {"deadline": 2},
                         bytes_down=2000 * rnd, bytes_up=2200 * rnd, cum_bytes=4200 * rnd, round_s=1.5 * rnd,
                         aggregate_s=0.01, eval={"top1": 0.4 * rnd, "loss": 1.8 / rnd, "samples": 100},
                         devices_online=2)


def test_scalar_folder_logs_accepted_updates_and_aggregated_rounds() -> None:
    out = []
    folder = ScalarFolder()
    rl: list[dict[str, Any]] = []

    class Capture:
        def write(self, kind: str, **f: Any) -> None:
            rl.append({"kind": kind, **f})

    _write_run(Capture())  # type: ignore[arg-type]
    for rec in rl:
        out.extend(folder.feed(rec))
    rounds = [(s, step) for s, step in out if "round/top1" in s]
    assert [step for _, step in rounds] == [1, 2]
    assert rounds[1][0]["round/epsilon_max"] == 1.0 and rounds[1][0]["round/attempt"] == 2
    dev = [s for s, _ in out if "device/dev0/cpu_s" in s]
    assert len(dev) == 2 and "device/dev0/energy_j" not in dev[0]  # a missing figure is left out, never 0


def test_tensorboard_event_files_hold_the_round_and_device_scalars(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "trk"
    runlog = RunLog(run_dir)
    attach_trackers(runlog, _cfg(run_dir, enable_tensorboard=True), run_dir)
    _write_run(runlog)
    runlog.close()
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"round/top1", "round/loss", "round/bytes_down", "round/bytes_up", "round/round_s", "round/epsilon_max",
            "device/dev0/train_loss", "device/dev1/epsilon", "device/dev0/cpu_s"} <= tags
    assert [(e.step, round(e.value, 6)) for e in acc.Scalars("round/top1")] == [(1, 0.4), (2, 0.8)]
    assert [e.value for e in acc.Scalars("round/bytes_up")] == [2200, 4400]
    assert [e.value for e in acc.Scalars("device/dev1/epsilon")] == [0.25, 0.5]
    assert "config" in "".join(acc.Tags()["tensors"])


@pytest.mark.slow  # MLflow creating its sqlite store (schema migrations) takes ~20 s on a busy 2-core box
def test_mlflow_run_has_metrics_params_and_artefacts(tmp_path: Path) -> None:
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    run_dir = tmp_path / "trk"
    cfg = _cfg(run_dir, enable_mlflow=True)
    runlog = RunLog(run_dir)
    dump_config(cfg, run_dir / "config.yaml")
    attach_trackers(runlog, cfg, run_dir)
    _write_run(runlog)
    (run_dir / "summary.json").write_text(json.dumps({"rounds": 2, "final_top1": 0.8}))
    runlog.close()
    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir.resolve() / 'mlflow' / 'mlflow.db'}")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "trk"
    assert run.data.params["train_args.learning_rate"] == "0.05" and run.data.params["train_args.comm_round"] == "2"
    hist = client.get_metric_history(run_id, "round/top1")
    assert sorted((m.step, round(m.value, 6)) for m in hist) == [(1, 0.4), (2, 0.8)]
    assert run.data.metrics["device/dev0/epsilon"] == 1.0
    assert {f.path for f in client.list_artifacts(run_id)} >= {"summary.json", "config.yaml", "metrics.jsonl", "report"}
