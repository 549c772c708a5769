"""RunLog sinks: every record reaches them, in order, off the writer's thread; failures stay contained."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from fedpeft_edge.server.runlog import RunLog, read_metrics


class ListSink:
    def __init__(self, delay: float = 0.0) -> None:
        self.records: list[dict[str, Any]] = []
        self.threads: set[str] = set()
        self.closed = False
        self.delay = delay

    def write(self, record: dict[str, Any]) -> None:
        time.sleep(self.delay)
        self.threads.add(threading.current_thread().name)
        self.records.append(record)

    def close(self) -> None:
        self.closed = True


class FailingSink(ListSink):
    def write(self, record: dict[str, Any]) -> None:
        if record["kind"] == "round":
            raise RuntimeError("tracker down")
        super().write(record)


def test_sinks_get_every_record_in_order_and_are_closed(tmp_path: Path) -> None:
    log = RunLog(tmp_path)
    sink = ListSink()
    log.add_sink(sink)
    for i in range(20):
        log.write("round", round=i, eval={"top1": 0.5})
    log.close()
    assert sink.closed
    assert [r["round"] for r in sink.records] == list(range(20))
    assert sink.records == read_metrics(tmp_path)  # exactly what the file holds
    assert threading.current_thread().name not in sink.threads


def test_a_slow_sink_does_not_block_the_writer(tmp_path: Path) -> None:
    log = RunLog(tmp_path)
    slow = ListSink(delay=0.2)
    log.add_sink(slow)
    t0 = time.perf_counter()
    for i in range(5):
        log.write("join", device_id=f"d{i}")
    elapsed = time.perf_counter() - t0
    assert elapsed < 0.9, f"5 writes took {elapsed:.2f}s behind a 0.2 s/record sink (1 s in all)"
    log.close()  # drains the queue
    assert len(slow.records) == 5


def test_a_failing_sink_is_logged_and_the_others_go_on(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    log = RunLog(tmp_path)
    bad, good = FailingSink(), ListSink()
    log.add_sink(bad)
    log.add_sink(good)
    with caplog.at_level(logging.WARNING, logger="fedpeft_edge.server.runlog"):
        for i in range(3):
            log.write("round", round=i)
            log.write("join", device_id="d")
        log.close()
    assert len(good.records) == 6 and len(bad.records) == 3
    assert "FailingSink failed on a round record" in caplog.text
    assert "failed on 3 records" in caplog.text
    assert len(read_metrics(tmp_path)) == 6  # the file is untouched by the sink's failures


def test_replay_sends_what_is_on_disk_first(tmp_path: Path) -> None:
    log = RunLog(tmp_path)
    log.write("join", device_id="a")
    sink = ListSink()
    log.add_sink(sink, replay=True)
    log.write("join", device_id="b")
    log.close()
    assert [r["device_id"] for r in sink.records] == ["a", "b"]
