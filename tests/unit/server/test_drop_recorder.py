"""dropped_message records: the first drops of each second one by one, the rest summed with a count."""

from __future__ import annotations

from pathlib import Path

from fedpeft_edge.drops import DroppedMessage, DropReason, DropRecorder
from fedpeft_edge.server.runlog import RunLog, read_metrics


def test_drops_are_coalesced_but_all_counted(tmp_path: Path) -> None:
    now = [0.0]
    rec = DropRecorder(RunLog(tmp_path), burst=3, clock=lambda: now[0])
    for i in range(50):
        rec(DroppedMessage("d2", "fedpeft/r/d2s/d2", "unsigned" if i % 2 else "malformed", "why", 10))
    rec(DroppedMessage("d2", "t", "inbox_full", "full", 500, count=7))
    now[0] = 2.0
    rec(DroppedMessage("d1", "fedpeft/r/d2s/d1", "bad_signature", "forged", 5))
    rec.flush()
    records = read_metrics(tmp_path, "dropped_message")
    assert sum(r.get("count", 1) for r in records) == 50 + 7 + 1
    assert len(records) == 3 + 3 + 1  # 3 singles, 3 sums, then a new second's single
    assert {"sender", "topic", "reason", "detail", "bytes"} <= set(records[0])


def test_drop_log_counts_and_a_failing_sink_is_contained() -> None:
    def sink(_d: DroppedMessage) -> None:
        raise RuntimeError("sink down")

    log = DropRecorder(sink=sink, log_burst=2)
    for _ in range(10):
        log(DroppedMessage("x", "t", DropReason.MALFORMED, "d", 1))
    assert log.counts == {"malformed": 10}


def test_engine_and_transport_drops_share_one_record(tmp_path: Path) -> None:
    now = [0.0]
    rec = DropRecorder(RunLog(tmp_path), burst=2, clock=lambda: now[0])
    rec(DroppedMessage("d2", "fedpeft/r/d2s/d2", DropReason.UNSIGNED, "no signature", 10))
    for _ in range(5):
        rec.drop("d2", DropReason.RATE_LIMITED, "more than train_args.join_rate_per_min=6 joins a minute")
    rec.flush()
    records = read_metrics(tmp_path, "dropped_message")
    assert rec.total == 6 and rec.coalesced == 4
    assert sum(r.get("count", 1) for r in records) == 6
    assert records[1] == {**records[1], "sender": "d2", "topic": None, "reason": "rate_limited", "bytes": None}
    assert records[-1]["count"] == 4
    assert rec.counts == {"unsigned": 1, "rate_limited": 5}
