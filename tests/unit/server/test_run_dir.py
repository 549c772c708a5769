"""A run directory is never reused: a new run refuses one that holds a run; a server that never started the
run (it could not connect) writes nothing into it; `simulate` exits non-zero unless the run completed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from fedpeft_edge.cli import main as fedpeft_edge
from fedpeft_edge.config import load_config
from fedpeft_edge.errors import CheckpointError, TransportError
from fedpeft_edge.rundir import read_class_names, refuse_reuse, started_run

TINY_VIT = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}

pytestmark = pytest.mark.slow  # two tiny simulations (~10 s)


def _config(tmp_path: Path, run_id: str = "reuse") -> Path:
    cfg = {
        "common_args": {"run_id": run_id, "random_seed": 3},
        "data_args": {"dataset": "digits", "image_size": 32, "batch_size": 16, "max_train_samples": 120,
                      "max_test_samples": 40, "min_samples_per_client": 5},
        "model_args": {"model": "vit_tiny_patch16_224", "num_classes": 10, "weights": "none",
                       "model_kwargs": TINY_VIT},
        "peft_args": {"method": "head"},
        "train_args": {"client_num_in_total": 2, "client_num_per_round": 2, "min_devices": 2, "comm_round": 1,
                       "max_steps": 1},
        "device_args": {"num_threads": 1, "measure_latency": False},
        "tracking_args": {"run_dir": str(tmp_path / "runs")},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_an_existing_run_id_is_refused_unless_resumed(tmp_path: Path, capsys: Any) -> None:
    cfg = _config(tmp_path)
    assert fedpeft_edge(["simulate", "--config", str(cfg)]) == 0
    run_dir = tmp_path / "runs" / "reuse"
    metrics, saved = (run_dir / "metrics.jsonl").read_bytes(), (run_dir / "config.yaml").read_bytes()
    assert started_run(run_dir) is not None
    assert read_class_names(run_dir) == tuple(str(i) for i in range(10))  # the run's label order (digits)

    assert fedpeft_edge(["simulate", "--config", str(cfg), "--rounds", "2"]) == 2
    err = capsys.readouterr().err
    assert "already holds run 'reuse'" in err and "--resume" in err
    assert (run_dir / "metrics.jsonl").read_bytes() == metrics  # nothing appended
    assert (run_dir / "config.yaml").read_bytes() == saved  # nor rewritten


def test_a_server_that_cannot_connect_writes_nothing_into_the_run_dir(tmp_path: Path) -> None:
    from fedpeft_edge.server.app import ServerApp

    cfg = load_config(_config(tmp_path, "never"))
    run_dir = tmp_path / "runs" / "never"

    def unreachable(*_args: Any, **_kw: Any) -> Any:
        raise TransportError("cannot connect to the broker at 127.0.0.1:1")

    with pytest.raises(TransportError):
        ServerApp(cfg, run_dir, backend=unreachable)
    assert not (run_dir / "config.yaml").exists()
    assert started_run(run_dir) is None  # so the same run id may be used again once the broker is up
    refuse_reuse(run_dir, "never")


def test_started_run_reads_records_summary_or_checkpoint(tmp_path: Path) -> None:
    assert started_run(tmp_path) is None
    (tmp_path / "metrics.jsonl").write_text("")
    (tmp_path / "demo-config.yaml").write_text("{}")  # the demo's own files before its server starts
    assert started_run(tmp_path) is None
    (tmp_path / "metrics.jsonl").write_text('{"kind": "join"}\n')
    assert started_run(tmp_path) == "metrics.jsonl with 1 records"
    with pytest.raises(CheckpointError, match="pick another common_args.run_id"):
        refuse_reuse(tmp_path, "x")
