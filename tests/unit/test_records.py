"""The run records: one class per kind, read back from any version, and docs/design.md generated from them."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from fedpeft_edge.records import (
    BY_KIND,
    METRICS_RECORDS,
    SCHEMA_BEGIN,
    SCHEMA_END,
    DeviceRoundRecord,
    DroppedMessage,
    Record,
    RoundRecord,
    RunSummary,
    parse_record,
    schema_markdown,
)

DESIGN = Path(__file__).resolve().parents[2] / "docs" / "design.md"


def _doc_block() -> str:
    text = DESIGN.read_text(encoding="utf-8")
    start, end = text.index(SCHEMA_BEGIN), text.index(SCHEMA_END) + len(SCHEMA_END)
    return text[start:end]


def test_the_design_docs_record_schema_is_the_classes() -> None:
    assert _doc_block() == schema_markdown(), (
        "docs/design.md's record schema differs from fedpeft_edge/records.py: replace the block between the "
        "records:begin/end markers with the output of `python -c 'from fedpeft_edge.records import "
        "schema_markdown; print(schema_markdown())'`")


def test_a_field_added_to_a_class_shows_in_the_schema(monkeypatch: pytest.MonkeyPatch) -> None:
    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Wider(RoundRecord):
        new_figure: int | None = None  # a key the doc does not list

    monkeypatch.setattr("fedpeft_edge.records.METRICS_RECORDS", (*METRICS_RECORDS[:-1], Wider))
    assert "`new_figure`" in schema_markdown() and _doc_block() != schema_markdown()


def test_every_kind_is_unique_and_round_trips() -> None:
    assert len(BY_KIND) == len(METRICS_RECORDS) and all(c.KIND for c in METRICS_RECORDS)
    for cls in METRICS_RECORDS:
        rec = cls.from_dict({"kind": cls.KIND, "time": 5.0, **{n: None for n in cls.field_names()}})
        assert type(parse_record(rec.to_dict())) is cls
        assert cls.from_dict(rec.to_dict()) == rec


def test_older_and_newer_records_are_read() -> None:
    old = {"kind": "round", "time": 1.0, "round": 2, "selected": ["a"], "eval": {"top1": 0.5}, "legacy": 7}
    rec = RoundRecord.from_dict(old)
    assert rec.round == 2 and rec.status is None and rec.dropped is None and rec.eval_value("top1") == 0.5
    assert rec.extra == {"legacy": 7} and rec.to_dict()["legacy"] == 7
    assert parse_record({"kind": "from_the_future", "x": 1}) is None
    assert RunSummary.from_dict({"rounds": 3, "final_top1": 0.9}).end_reason is None


def test_json_keys_are_the_writers() -> None:
    drop = DroppedMessage("d1", "t", "unsigned", "why", 10)
    assert drop.fields() == {"sender": "d1", "topic": "t", "reason": "unsigned", "detail": "why", "bytes": 10}
    assert DroppedMessage.from_dict({**drop.to_dict(), "count": 3}).count == 3
    dev = DeviceRoundRecord(round=1, device_id="d", status="accepted")
    assert "rank" not in dev.fields() and DeviceRoundRecord(rank=4).fields()["rank"] == 4
    summary = RunSummary(rounds=1, end_reason="completed")
    assert "final_perplexity" not in summary.to_dict() and "kind" not in summary.to_dict()
    assert json.loads(json.dumps(RoundRecord(round=1, dropped={"late": 1}).to_dict()))["dropped"] == {"late": 1}


def test_records_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        RoundRecord(round=1).round = 2  # type: ignore[misc]
    assert issubclass(DroppedMessage, Record)
