"""A run directory's append-only metrics.jsonl and its summary.json (schema: docs/design.md)."""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from pathlib import Path
from typing import Any, Protocol

from fedpeft_edge.records import Record
from fedpeft_edge.rundir import read_metrics

log = logging.getLogger(__name__)


class Sink(Protocol):
    """Receives every record the run log writes (dashboard, TensorBoard, MLflow), on its own thread."""

    def write(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class _SinkWorker:
    """Feeds one sink from a queue on a daemon thread: a slow sink never blocks the round flow, and a
    failing one is logged (first failure with its traceback) and never reaches the writer."""

    _STOP = object()

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self.failures = 0
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=f"runlog-sink-{type(sink).__name__}", daemon=True)
        self._thread.start()

    def put(self, record: dict[str, Any]) -> None:
        self._queue.put(record)

    def _loop(self) -> None:
        while True:
            record = self._queue.get()
            if record is self._STOP:
                return
            try:
                self.sink.write(record)
            except Exception:  # a sink must never stop the run
                self.failures += 1
                if self.failures == 1:
                    log.exception("run log sink %s failed on a %s record; the run goes on",
                                  type(self.sink).__name__, record.get("kind"))
                else:
                    log.debug("run log sink %s failed again (%d failures)", type(self.sink).__name__, self.failures)

    def close(self, timeout: float) -> None:
        """Deliver what is queued (up to timeout seconds), then close the sink."""
        self._queue.put(self._STOP)
        self._thread.join(timeout)
        if self._thread.is_alive():  # closing it now would race its thread: leave it, say what is lost
            log.warning("run log sink %s still busy after %.0fs (%d records undelivered); not closed",
                        type(self.sink).__name__, timeout, self._queue.qsize())
            return
        try:
            self.sink.close()
        except Exception:
            log.exception("run log sink %s failed to close", type(self.sink).__name__)
        if self.failures:
            log.warning("run log sink %s failed on %d records", type(self.sink).__name__, self.failures)


class RunLog:
    """Appends one JSON record per line. Each record is handed to the OS at once (a killed server loses none)
    but made durable (fsync) only by `sync()`, once per round and at the end: join spam cannot turn into one
    fsync per message.

    Sinks added with `add_sink` get every record written afterwards (and, with replay, the records already
    in the file), each through its own queue and thread.
    """

    def __init__(self, run_dir: str | Path, sink_close_timeout_s: float = 120.0) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "metrics.jsonl"
        self._fh = self.path.open("a", encoding="utf-8")
        self._sinks: list[_SinkWorker] = []
        # one encoder for the run: json.dumps(default=...) builds a new one per call (~1 us a record, bench_engine)
        self._json = json.JSONEncoder(default=_jsonable)
        self._sink_close_timeout_s = sink_close_timeout_s

    def add_sink(self, sink: Sink, replay: bool = False) -> None:
        """Send every record written from now on to sink; replay=True first sends the records on disk."""
        worker = _SinkWorker(sink)
        if replay and self.path.stat().st_size:
            for rec in read_metrics(self.run_dir):
                worker.put(rec)
        self._sinks.append(worker)

    def write(self, kind: str, **fields: Any) -> dict[str, Any]:
        return self._write({"kind": kind, "time": time.time(), **fields})

    def append(self, record: Record) -> dict[str, Any]:
        """Append one typed record (fedpeft_edge/records.py), as `write(record.KIND, **record.fields())` would."""
        return self._write({"kind": record.KIND, "time": time.time(), **record.fields()})

    def _write(self, record: dict[str, Any]) -> dict[str, Any]:
        line = self._json.encode(record)
        self._fh.write(line + "\n")
        self._fh.flush()
        if self._sinks:
            shared = json.loads(line)  # sinks see exactly what the file holds, never the caller's live objects
            for worker in self._sinks:
                worker.put(shared)
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
        """fsync and close the file, then drain and close every sink."""
        if not self._fh.closed:
            self.sync()
            self._fh.close()
        sinks, self._sinks = self._sinks, []
        for worker in sinks:
            worker.close(self._sink_close_timeout_s)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, (set, tuple)):
        return list(value)
    return str(value)
