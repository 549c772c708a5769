"""A run directory's metrics.jsonl, read: the one reader the server (resume), the report and tests share.

Writing is server/runlog.py's; reading lives here so the report does not depend on the server.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from fedpeft_edge.errors import CheckpointError

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


def read_metrics(run_dir: str | Path, kind: str | None = None) -> list[dict[str, Any]]:
    """All records of a run's metrics.jsonl (optionally of one kind); a torn last line is skipped."""
    path = Path(run_dir) / METRICS_FILE
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


def describe_divergence(rec: dict[str, Any]) -> str:
    """One line for a `divergence` record (engine: round, device_id, metric, value, threshold, hint)."""
    device = rec.get("device_id")
    where = f"round {rec.get('round')} " + (f"device {device}" if device else "global model")
    metric, value, threshold = rec.get("metric"), rec.get("value"), rec.get("threshold")
    seen = f"{metric} {_fmt(value)}" if metric else ""
    if seen and isinstance(threshold, (int, float)):
        seen += f" (chance-level threshold {threshold:.4g})"
    hint = rec.get("hint") or rec.get("message") or ""
    return f"{where}: {seen}{'; ' if seen and hint else ''}{hint}"


def _fmt(value: Any) -> str:
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:.4g}"
    return str(value)
