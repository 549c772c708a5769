"""A run directory's append-only metrics.jsonl and its summary.json (schema: docs/design.md)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from fedpeft_edge.rundir import read_metrics


class RunLog:
    """Appends one JSON record per line. Each record is handed to the OS at once (a killed server loses none)
    but made durable (fsync) only by `sync()`, once per round and at the end: join spam cannot turn into one
    fsync per message."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "metrics.jsonl"
        self._fh = self.path.open("a", encoding="utf-8")

    def write(self, kind: str, **fields: Any) -> dict[str, Any]:
        record = {"kind": kind, "time": time.time(), **fields}
        self._fh.write(json.dumps(record, default=_jsonable) + "\n")
        self._fh.flush()
        return record

    def sync(self) -> None:
        """fsync what was written (the engine calls it when a round closes and when the run ends)."""
        if not self._fh.closed:
            self._fh.flush()
            os.fsync(self._fh.fileno())

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
        if not self._fh.closed:
            self.sync()
            self._fh.close()


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, (set, tuple)):
        return list(value)
    return str(value)
