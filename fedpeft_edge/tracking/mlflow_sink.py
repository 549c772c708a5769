"""A run-log sink logging to MLflow (MlflowClient): the config as params, round and device metrics, and at
the end the report, config and final checkpoint as artefacts. One MLflow run per run directory: a resumed
server continues the run it started (its id is kept in <run dir>/mlflow_run_id)."""

from __future__ import annotations

import importlib.util
import logging
import time
from pathlib import Path
from typing import Any

from fedpeft_edge.errors import TrackingError
from fedpeft_edge.tracking.scalars import ScalarFolder, flatten_config

log = logging.getLogger(__name__)

_PARAMS_PER_BATCH = 100  # MLflow's log_batch limit
_PARAM_CHARS = 6000
_ARTEFACTS = ("summary.json", "config.yaml", "metrics.jsonl", "checkpoint.json")


def default_tracking_uri(run_dir: str | Path) -> str:
    """A local store inside the run directory (MLflow 3 refuses plain file stores by default)."""
    store = Path(run_dir).resolve() / "mlflow"
    store.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{store / 'mlflow.db'}"


class MlflowSink:
    """Logs every aggregated round's metrics at step = round; device metrics under `device/<id>/...`."""

    def __init__(self, cfg: Any, run_dir: str | Path) -> None:
        if importlib.util.find_spec("mlflow") is None:
            raise TrackingError("tracking_args.enable_mlflow needs mlflow (mlflow-skinny): "
                                "pip install 'fedpeft-edge[tracking]'")
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.tracking_uri = cfg.tracking_args.mlflow_tracking_uri or default_tracking_uri(self.run_dir)
        self.run_id: str | None = None
        self._folder = ScalarFolder()
        self._client: Any = None
        self._error: TrackingError | None = None

    @property
    def client(self) -> Any:
        """The MlflowClient, opened on first use: importing MLflow and creating its store takes seconds,
        spent on the sink's thread, never in the server's start-up or round flow."""
        if self._client is None:
            if self._error is not None:  # opening failed once: do not spend seconds on every record
                raise self._error
            try:
                self._client = self._open()
            except TrackingError as exc:
                self._error = exc
                raise
        return self._client

    def _open(self) -> Any:
        from mlflow.tracking import MlflowClient

        from fedpeft_edge.config import redacted_config_dict

        args = self.cfg.tracking_args
        try:
            client = MlflowClient(tracking_uri=self.tracking_uri)
            self._client = client
            self.run_id = self._open_run(args.mlflow_experiment_name, self.cfg.common_args.run_id)
            self._log_params(flatten_config(redacted_config_dict(self.cfg)))
        except Exception as exc:  # MLflow raises its own exception types and plain OSErrors alike
            self._client = None
            raise TrackingError(f"cannot open MLflow store {self.tracking_uri}: {exc}; set "
                                "tracking_args.mlflow_tracking_uri to a reachable store") from exc
        log.info("MLflow run %s in %s", self.run_id, self.tracking_uri)
        return client

    def _open_run(self, experiment_name: str, run_name: str) -> str:
        marker = self.run_dir / "mlflow_run_id"
        if marker.exists():  # a resumed server: continue the same MLflow run
            run_id = marker.read_text(encoding="utf-8").strip()
            try:
                self.client.update_run(run_id, status="RUNNING")
                return run_id
            except Exception as exc:
                log.warning("MLflow run %s of %s not found (%s); starting a new one", run_id, marker, exc)
        exp = self.client.get_experiment_by_name(experiment_name)
        if exp is not None:
            exp_id = exp.experiment_id
        else:
            artifacts = (self.run_dir.resolve() / "mlflow" / "artifacts").as_uri()
            exp_id = self.client.create_experiment(
                experiment_name, artifact_location=artifacts if self.tracking_uri.startswith("sqlite:") else None)
        run = self.client.create_run(exp_id, run_name=run_name, tags={"fedpeft.run_dir": str(self.run_dir)})
        marker.write_text(run.info.run_id, encoding="utf-8")
        return str(run.info.run_id)

    def _log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        items = [Param(k, v[:_PARAM_CHARS]) for k, v in params.items() if k not in existing]
        for i in range(0, len(items), _PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=items[i:i + _PARAMS_PER_BATCH])

    def write(self, record: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        client = self.client
        stamp = int(1000 * float(record.get("time") or time.time()))
        metrics = [Metric(k, v, stamp, step) for scalars, step in self._folder.feed(record) for k, v in scalars.items()]
        if metrics:
            client.log_batch(self.run_id, metrics=metrics)

    def close(self) -> None:
        report = self._write_report()
        if report is not None:
            self.client.log_artifacts(self.run_id, str(report), artifact_path="report")
        for rel in _ARTEFACTS:
            path = self.run_dir / rel
            if path.exists():
                self.client.log_artifact(self.run_id, str(path), artifact_path=str(Path(rel).parent).strip("."))
        final = _final_checkpoint(self.run_dir)
        if final is not None:
            self.client.log_artifact(self.run_id, str(final), artifact_path="checkpoints")
        finished = (self.run_dir / "summary.json").exists()
        self.client.set_terminated(self.run_id, status="FINISHED" if finished else "KILLED")


    def _write_report(self) -> Path | None:
        """The run's report (report.html, PNGs, CSVs), written now so the MLflow run carries it."""
        from fedpeft_edge.errors import FedPeftError
        from fedpeft_edge.report import write_report

        try:
            return write_report([self.run_dir], self.run_dir / "report").html.parent
        except (FedPeftError, OSError, ValueError) as exc:
            log.warning("no report for the MLflow run of %s: %s", self.run_dir, exc)
            return None


def _final_checkpoint(run_dir: Path) -> Path | None:
    from fedpeft_edge.errors import CheckpointError
    from fedpeft_edge.server.checkpoint import latest_round

    try:
        last = latest_round(run_dir)
    except CheckpointError:
        return None
    if last is None:
        return None
    path = run_dir / "checkpoints" / f"round_{last:04d}.safetensors"
    return path if path.exists() else None
