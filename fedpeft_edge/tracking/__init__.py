"""Experiment tracking (TensorBoard, MLflow) as run-log sinks; `attach_trackers` wires what the config asks for."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedpeft_edge.server.runlog import RunLog


def attach_trackers(runlog: RunLog, cfg: Any, run_dir: str | Path) -> list[str]:
    """Add the sinks `cfg.tracking_args` enables to runlog; returns their names. Raises TrackingError when a
    tracker is enabled but its library is missing or its store cannot be opened."""
    args = cfg.tracking_args
    names = []
    if args.enable_tensorboard:
        from fedpeft_edge.tracking.tensorboard_sink import TensorBoardSink

        runlog.add_sink(TensorBoardSink(cfg, run_dir))
        names.append("tensorboard")
    if args.enable_mlflow:
        from fedpeft_edge.tracking.mlflow_sink import MlflowSink

        runlog.add_sink(MlflowSink(cfg, run_dir))
        names.append("mlflow")
    return names
