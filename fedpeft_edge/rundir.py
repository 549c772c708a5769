"""A run directory's metrics.jsonl, read: the one reader the server (resume), the report and tests share.

Writing is server/runlog.py's; reading lives here so the report does not depend on the server.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedpeft_edge.errors import CheckpointError
from fedpeft_edge.records import DivergenceRecord, R, RoundRecord, RunSummary

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CLASSES_FILE = "classes.json"  # the run's class names in label order (written when the server knows them)


def read_class_names(run_dir: str | Path) -> tuple[str, ...] | None:
    """The run's class names from its classes.json, or None when it has none (or it is unreadable)."""
    try:
        names = json.loads((Path(run_dir) / CLASSES_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return tuple(str(n) for n in names) if isinstance(names, list) else None


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


def read_records(run_dir: str | Path, cls: type[R]) -> list[R]:
    """The run's records of one kind, typed (fedpeft_edge/records.py), in file order."""
    return [cls.from_dict(rec) for rec in read_metrics(run_dir, cls.KIND)]


def read_summary(run_dir: str | Path) -> RunSummary | None:
    """The run's summary.json, typed; None when it has none (the run did not finish) or it is unreadable."""
    path = Path(run_dir) / SUMMARY_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        log.warning("%s is not readable JSON (%s); summary left out", path, exc)
        return None
    return RunSummary.from_dict(data) if isinstance(data, dict) else None


def describe_divergence(rec: DivergenceRecord | Mapping[str, Any]) -> str:
    """One line for a `divergence` record (engine: round, device_id, metric, value, threshold, hint)."""
    d = rec if isinstance(rec, DivergenceRecord) else DivergenceRecord.from_dict(rec)
    where = f"round {d.round} " + (f"device {d.device_id}" if d.device_id else "global model")
    seen = f"{d.metric} {_fmt(d.value)}" if d.metric else ""
    if seen and isinstance(d.threshold, (int, float)):
        seen += f" (chance-level threshold {d.threshold:.4g})"
    hint = d.hint or d.extra.get("message") or ""  # older records said `message`
    return f"{where}: {seen}{'; ' if seen and hint else ''}{hint}"


def _fmt(value: Any) -> str:
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:.4g}"
    return str(value)


def started_run(run_dir: str | Path) -> str | None:
    """What shows that a server already started a run in run_dir (its records, summary or checkpoint), or None
    when it holds none: a directory a server created and then failed in (no connection) may be used again."""
    root = Path(run_dir)
    metrics = root / METRICS_FILE
    if metrics.is_file() and metrics.stat().st_size:
        return f"{METRICS_FILE} with {sum(1 for _ in metrics.open('rb'))} records"
    for name in ("summary.json", "checkpoint.json"):
        if (root / name).is_file():
            return name
    return None


def refuse_reuse(run_dir: str | Path, run_id: str) -> None:
    """A new run never goes into a run directory that holds another run (it would append to its metrics)."""
    found = started_run(run_dir)
    if found is not None:
        raise CheckpointError(
            f"run directory {run_dir} already holds run {run_id!r} ({found}): a new run never reuses it; pick "
            f"another common_args.run_id (or --run-id), or continue that run with `fedpeft-server --resume "
            f"{run_dir}` (`fedpeft-edge simulate --resume`)"
        )


def describe_round(rec: RoundRecord | Mapping[str, Any], rounds: int) -> str:
    """One line for a `round` record (the demo's and the server console's progress line)."""
    r = rec if isinstance(rec, RoundRecord) else RoundRecord.from_dict(rec)
    ev = r.eval or {}
    acc = f"{100 * ev['top1']:.1f}%" if ev.get("top1") is not None else "-"
    if ev.get("perplexity") is not None:  # a causal LM: held-out perplexity, next-token accuracy
        acc = f"{acc} next-token, perplexity {ev['perplexity']:.2f}"
    status = "" if (r.status or "aggregated") == "aggregated" else f" FAILED (attempt {r.attempt})"
    drops = f", dropped {dict(r.dropped)}" if r.dropped else ""
    return (f"round {r.round}/{rounds}{status}: acc {acc}, {r.accepted} updates, "
            f"{r.devices_online} online, {_mb(r.bytes_down)} down / {_mb(r.bytes_up)} "
            f"up, {float(r.round_s or 0):.1f}s, total {_mb(r.cum_bytes)}{drops}")


def _mb(value: Any) -> str:
    return f"{(value or 0) / 1e6:.3f} MB"
