"""The run records, one class each: what the server writes to metrics.jsonl and summary.json, and what every
reader (report, dashboard, tracking, lab, study, resume) parses. docs/design.md's record schema is checked
against these classes by tests/unit/test_records.py.

A record class is a frozen dataclass with `KIND` (its metrics.jsonl `kind`), `to_dict()` (the JSON object,
keys in field order) and `from_dict()` (which reads any version's record: a missing key is None, a key this
version does not know is kept in `extra` and written back). Names and values are never renamed: run
directories of earlier versions are resumed and reported.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar

R = TypeVar("R", bound="Record")

_BASE = ("time", "extra")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Record:
    """One metrics.jsonl line. `time` is set by the run log when it writes it (epoch seconds)."""

    KIND: ClassVar[str] = ""
    OPTIONAL: ClassVar[frozenset[str]] = frozenset()  # fields written only when they are not None

    time: float | None = None
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # keys this version does not know

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """The record's own keys, in the order written (without `kind` and `time`)."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.name not in _BASE)

    def fields(self) -> dict[str, Any]:
        """The keys a writer passes to the run log (`RunLog.write(KIND, **fields)`): all but `kind` and `time`."""
        out = {n: getattr(self, n) for n in self.field_names()}
        for n in self.OPTIONAL:
            if out[n] is None:
                del out[n]
        out.update(self.extra)
        return out

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of this record, as metrics.jsonl holds it."""
        head: dict[str, Any] = {"kind": self.KIND} if self.KIND else {}
        if self.time is not None:
            head["time"] = self.time
        return {**head, **self.fields()}

    @classmethod
    def from_dict(cls: type[R], rec: Mapping[str, Any]) -> R:
        """Read a record of any version: missing keys are None, unknown ones kept in `extra`."""
        names = set(cls.field_names())
        known = {k: v for k, v in rec.items() if k in names}
        extra = {k: v for k, v in rec.items() if k not in names and k not in ("kind", "time")}
        t = rec.get("time")
        return cls(time=t if isinstance(t, (int, float)) and not isinstance(t, bool) else None, extra=extra,
                   **known)


@dataclasses.dataclass(frozen=True, kw_only=True)
class JoinRecord(Record):
    """A device asked to join: accepted, or refused with the reason (and the fix)."""

    KIND: ClassVar[str] = "join"
    device_id: str | None = None
    accepted: bool | None = None
    reason: str | None = None
    client_idx: int | None = None
    profile: Mapping[str, Any] | None = None  # the device's static profile (hostname, model, cpu, memory ...)
    data_stats: Mapping[str, Any] | None = None  # num_train, num_test, label_hist
    num_samples: int | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class AssignmentRecord(Record):
    """The rank the run's shape plan gave a device (LoRA flexlora), at join (`after_round` None) or after a round."""

    KIND: ClassVar[str] = "assignment"
    device_id: str | None = None
    after_round: int | None = None
    rank: int | None = None
    rank_min: int | None = None
    rank_max: int | None = None
    memory_mb: float | None = None
    memory_source: str | None = None
    reason: str | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class PresenceRecord(Record):
    """A known device's presence changed."""

    KIND: ClassVar[str] = "presence"
    device_id: str | None = None
    online: bool | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class DeviceStatusRecord(Record):
    """A device reported its status (its privacy budget spent)."""

    KIND: ClassVar[str] = "device_status"
    device_id: str | None = None
    status: str | None = None
    epsilon: float | None = None
    round: int | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class DeviceErrorRecord(Record):
    """A device reported that it failed a round."""

    KIND: ClassVar[str] = "device_error"
    device_id: str | None = None
    round: int | None = None
    error: str | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class ResumeRecord(Record):
    """The server resumed the run from its checkpoint of `round`."""

    KIND: ClassVar[str] = "resume"
    round: int | None = None
    next_round: int | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class RoundOpenRecord(Record):
    """A round (attempt) opened: its devices and deadline (epoch seconds)."""

    KIND: ClassVar[str] = "round_open"
    round: int | None = None
    attempt: int | None = None
    selected: list[str] | None = None
    deadline: float | None = None
    opened_at: float | None = None
    mode: str | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class DeviceRoundRecord(Record):
    """What one device did in one round: accepted or dropped (and why), its traffic and its own report."""

    KIND: ClassVar[str] = "device_round"
    OPTIONAL: ClassVar[frozenset[str]] = frozenset({"rank"})
    round: int | None = None
    attempt: int | None = None
    device_id: str | None = None
    status: str | None = None  # "accepted" | "dropped"
    drop_reason: str | None = None  # a DropReason value, "invalid: <why>" for an update that did not validate
    num_samples: int | None = None
    declared_samples: int | None = None
    bytes_down: int | None = None  # MQTT bytes metered at the wire ("encoded" frames in simulation)
    bytes_up: int | None = None
    msgs_down: int | None = None
    msgs_up: int | None = None
    download_s: float | None = None
    upload_s: float | None = None
    train_s: float | None = None  # from here to encode_s: the device's own report (protocol.DeviceReport)
    train_loss: float | None = None
    train_loss_end: float | None = None
    train_acc: float | None = None
    epsilon: float | None = None
    images_per_s: float | None = None
    resources: Mapping[str, Any] | None = None
    global_eval: Mapping[str, Any] | None = None
    steps: int | None = None
    nonfinite: list[str] | None = None
    set_state_s: float | None = None
    encode_s: float | None = None
    response_s: float | None = None
    update_norm: float | None = None
    norm_action: str | None = None  # "clipped" | "dropped" | None
    staleness: int | None = None  # async
    staleness_weight: float | None = None  # async
    bytes_kind: str | None = None  # "wire" | "encoded"
    rank: int | None = None  # the LoRA rank the update was trained at (flexlora); absent otherwise


@dataclasses.dataclass(frozen=True, kw_only=True)
class RoundRecord(Record):
    """One round attempt: aggregated or failed, its drops per reason, bytes and the global model's evaluation."""

    KIND: ClassVar[str] = "round"
    OPTIONAL: ClassVar[frozenset[str]] = frozenset({"dropped_messages", "dropped_messages_coalesced"})
    round: int | None = None
    attempt: int | None = None
    status: str | None = None  # "aggregated" | "failed"
    selected: list[str] | None = None
    accepted: int | None = None
    dropped: Mapping[str, int] | None = None  # {DropReason value: count}
    bytes_down: int | None = None
    bytes_up: int | None = None
    cum_bytes: int | None = None
    round_s: float | None = None
    aggregate_s: float | None = None
    eval: Mapping[str, Any] | None = None  # {loss, top1, samples, ...} or None
    devices_online: int | None = None
    mode: str | None = None  # "sync" | "async"
    bytes_kind: str | None = None
    dropped_messages: int | None = None  # all drops so far
    dropped_messages_coalesced: int | None = None  # of those, the ones written in summed records

    @property
    def aggregated(self) -> bool:
        return self.status == "aggregated"

    def eval_value(self, name: str) -> float | None:
        """A number of the round's evaluation (top1, loss, perplexity ...), or None."""
        v = (self.eval or {}).get(name)
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


@dataclasses.dataclass(frozen=True, kw_only=True)
class DivergenceRecord(Record):
    """A learning rate that is too high, seen on a device's training loss or on the global model."""

    KIND: ClassVar[str] = "divergence"
    round: int | None = None
    device_id: str | None = None  # None: the global model
    metric: str | None = None  # train_loss_end | train_loss | top1 | eval_loss
    value: Any = None  # a number, or "non-finite"
    threshold: float | None = None
    hint: str | None = None


@dataclasses.dataclass(frozen=True)
class DroppedMessage(Record):
    """A packet or message refused before it reached the round flow (transport or engine), or a sum of them
    (`count`; a record without it stands for one drop). Its fields may be given by position, in this order."""

    KIND: ClassVar[str] = "dropped_message"
    sender: str | None = None  # the node the topic names (claimed; unauthenticated unless the reason says so)
    topic: str | None = None
    reason: str = ""  # a DropReason value
    detail: str = ""  # the error's message
    bytes: int | None = None  # payload bytes of what was dropped
    count: int = 1  # drops this record stands for (a full inbox, a summed window)

    def fields(self, always_count: bool = False) -> dict[str, Any]:
        out = super().fields()
        out["reason"] = str(self.reason)
        if self.count == 1 and not always_count:
            del out["count"]
        return out

    def record(self) -> dict[str, object]:
        """The record's keys as written (without kind and time)."""
        return self.fields()

    @classmethod
    def from_dict(cls, rec: Mapping[str, Any]) -> DroppedMessage:
        count = rec.get("count")
        return super().from_dict({**rec, "count": count if isinstance(count, int) else 1})


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunSummary(Record):
    """summary.json: final accuracy, bytes per direction and per round, drops per reason, why the run ended."""

    OPTIONAL: ClassVar[frozenset[str]] = frozenset({"final_perplexity", "best_perplexity"})
    rounds: int | None = None  # rounds aggregated
    final_top1: float | None = None
    best_top1: float | None = None
    final_perplexity: float | None = None  # causal LMs only
    best_perplexity: float | None = None
    bytes_down: int | None = None
    bytes_up: int | None = None
    bytes_total: int | None = None
    bytes_per_round: float | None = None
    shared_params: int | None = None
    backbone_fingerprint: str | None = None
    dropped: Mapping[str, int] | None = None  # {DropReason value: count} over all rounds
    end_reason: str | None = None  # "completed", or why the run ended early
    bytes_kind: str | None = None


METRICS_RECORDS: tuple[type[Record], ...] = (
    JoinRecord, AssignmentRecord, PresenceRecord, DeviceStatusRecord, DeviceErrorRecord, ResumeRecord,
    RoundOpenRecord, DeviceRoundRecord, RoundRecord, DivergenceRecord, DroppedMessage,
)
BY_KIND: dict[str, type[Record]] = {c.KIND: c for c in METRICS_RECORDS}


def parse_record(rec: Mapping[str, Any]) -> Record | None:
    """The typed record of one metrics.jsonl object, or None for a kind this version does not know."""
    cls = BY_KIND.get(str(rec.get("kind")))
    return cls.from_dict(rec) if cls is not None else None
