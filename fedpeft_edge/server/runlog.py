"""A run directory's append-only metrics.jsonl and its summary.json (schema: docs/design.md)."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

from fedpeft_edge.errors import CheckpointError

log = logging.getLogger(__name__)


class RunLog:
    """Appends one JSON record per line and flushes it, so a killed server loses no completed record."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "metrics.jsonl"
        self._fh = self.path.open("a", encoding="utf-8")

    def write(self, kind: str, **fields: Any) -> dict[str, Any]:
        record = {"kind": kind, "time": time.time(), **fields}
        self._fh.write(json.dumps(record, default=_jsonable) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())
        return record

    def records(self, kind: str | None = None) -> list[dict[str, Any]]:
        return read_metrics(self.run_dir, kind)

    def truncate_after(self, last_round: int) -> None:
        """Drop records of rounds after last_round (written by a server killed before its checkpoint)."""
        keep = [r for r in read_metrics(self.run_dir) if int(r.get("round", 0) or 0) <= last_round]
        self._fh.close()
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in keep), encoding="utf-8")
        os.replace(tmp, self.path)
        self._fh = self.path.open("a", encoding="utf-8")

    def write_summary(self, summary: dict[str, Any]) -> Path:
        path = self.run_dir / "summary.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(summary, indent=1, default=_jsonable), encoding="utf-8")
        os.replace(tmp, path)
        return path

    def close(self) -> None:
        self._fh.close()


def read_metrics(run_dir: str | Path, kind: str | None = None) -> list[dict[str, Any]]:
    """All records of a run's metrics.jsonl (optionally of one kind); a torn last line is skipped."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise CheckpointError(f"{path} does not exist; pass a run directory written by fedpeft-server")
    out = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a server killed mid-write leaves a torn last line
            log.warning("%s:%d is not JSON; skipped", path, lineno)
            continue
        if isinstance(rec, dict) and (kind is None or rec.get("kind") == kind):
            out.append(rec)
    return out


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, (set, tuple)):
        return list(value)
    return str(value)


def describe_divergence(rec: dict[str, Any]) -> str:
    """One line for a `divergence` record (engine: round, device_id, metric, value, threshold, hint)."""
    device = rec.get("device_id")
    where = f"round {rec.get('round')} " + (f"device {device}" if device else "global model")
    metric, value, threshold = rec.get("metric"), rec.get("value"), rec.get("threshold")
    seen = f"{metric} {_fmt(value)}" if metric else ""
    if seen and isinstance(threshold, (int, float)):
        seen += f" (chance level {threshold:.4g})"
    hint = rec.get("hint") or rec.get("message") or ""
    return f"{where}: {seen}{'; ' if seen and hint else ''}{hint}"


def _fmt(value: Any) -> str:
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:.4g}"
    return str(value)
