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
import enum
import inspect
import io
import tokenize
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
        return _own_fields(cls)

    def fields(self) -> dict[str, Any]:
        """The keys a writer passes to the run log (`RunLog.write(KIND, **fields)`): all but `kind` and `time`."""
        # a record is written per update (bench_engine): one C-level copy of the instance dict, whose keys are the
        # dataclass fields in order (Record's own `time` and `extra` first), not a getattr per field
        out = dict(vars(self))
        del out["time"], out["extra"]
        for n in self.OPTIONAL:
            if out[n] is None:
                del out[n]
        if self.extra:
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


_OWN_FIELDS: dict[type, tuple[str, ...]] = {}  # record class -> its own field names (class metadata, not run state)


def _own_fields(cls: type) -> tuple[str, ...]:
    """A record class's own field names, computed once per class (dataclasses.fields walks every field)."""
    names = _OWN_FIELDS.get(cls)
    if names is None:
        names = _OWN_FIELDS[cls] = tuple(f.name for f in dataclasses.fields(cls) if f.name not in _BASE)
    return names


@dataclasses.dataclass(frozen=True, kw_only=True)
class JoinRecord(Record):
    """A device asked to join: accepted, or refused with the reason (and the fix)."""

    KIND: ClassVar[str] = "join"
    device_id: str | None = None
    accepted: bool | None = None
    reason: str | None = None  # why it was refused (what differs and the fix); null when accepted
    client_idx: int | None = None  # the data shard the device trains on
    profile: Mapping[str, Any] | None = None  # the device's static profile (hostname, device_model, cpu_model, ...)
    data_stats: Mapping[str, Any] | None = None  # num_train, num_test, label_hist
    num_samples: int | None = None  # the sample count it declared (updates may not claim more)


@dataclasses.dataclass(frozen=True, kw_only=True)
class AssignmentRecord(Record):
    """The rank the run's shape plan gave a device (LoRA flexlora), at join (`after_round` None) or after a round."""

    KIND: ClassVar[str] = "assignment"
    device_id: str | None = None
    after_round: int | None = None  # null: at join; else the round whose training time changed it
    rank: int | None = None  # the LoRA rank given (docs/lora.md)
    rank_min: int | None = None  # the plan's lowest rank
    rank_max: int | None = None  # the plan's highest rank
    memory_mb: float | None = None  # the device's memory the rank was sized for
    memory_source: str | None = None  # where that figure came from
    reason: str | None = None  # why this rank (memory or deadline)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PresenceRecord(Record):
    """A known device's presence changed."""

    KIND: ClassVar[str] = "presence"
    device_id: str | None = None
    online: bool | None = None  # its new presence


@dataclasses.dataclass(frozen=True, kw_only=True)
class DeviceStatusRecord(Record):
    """A device reported its status (its privacy budget spent)."""

    KIND: ClassVar[str] = "device_status"
    device_id: str | None = None
    status: str | None = None  # what the device said (its budget spent: it is never sampled again)
    epsilon: float | None = None  # the privacy it has spent
    round: int | None = None  # the round open when it said so


@dataclasses.dataclass(frozen=True, kw_only=True)
class DeviceErrorRecord(Record):
    """A device reported that it failed a round."""

    KIND: ClassVar[str] = "device_error"
    device_id: str | None = None
    round: int | None = None  # the round it failed
    error: str | None = None  # the device's error message


@dataclasses.dataclass(frozen=True, kw_only=True)
class ResumeRecord(Record):
    """The server resumed the run from its checkpoint of `round`."""

    KIND: ClassVar[str] = "resume"
    round: int | None = None  # the checkpoint's round
    next_round: int | None = None  # the round the run goes on with


@dataclasses.dataclass(frozen=True, kw_only=True)
class RoundOpenRecord(Record):
    """A round (attempt) opened: its devices and deadline (epoch seconds)."""

    KIND: ClassVar[str] = "round_open"
    round: int | None = None
    attempt: int | None = None  # the round's retry: 0 first, n after n failed attempts (both modes)
    selected: list[str] | None = None  # the devices sampled (async: those given a task)
    deadline: float | None = None  # epoch s
    opened_at: float | None = None  # epoch s
    mode: str | None = None  # "sync" or "async"


@dataclasses.dataclass(frozen=True, kw_only=True)
class DeviceRoundRecord(Record):
    """What one device did in one round: accepted or dropped (and why), its traffic and its own report."""

    KIND: ClassVar[str] = "device_round"
    OPTIONAL: ClassVar[frozenset[str]] = frozenset({"rank"})
    round: int | None = None
    attempt: int | None = None  # the round's retry (as in its round_open)
    device_id: str | None = None
    status: str | None = None  # "accepted" or "dropped"
    drop_reason: str | None = None  # a DropReason value, "invalid: <why>" for an update that did not validate
    num_samples: int | None = None  # as aggregated (capped at the join's declared count)
    declared_samples: int | None = None  # the count the device declared at join
    bytes_down: int | None = None  # MQTT bytes metered at the wire ("encoded" frames in simulation)
    bytes_up: int | None = None  # MQTT bytes metered at the wire ("encoded" frames in simulation)
    msgs_down: int | None = None  # messages to the device in the round
    msgs_up: int | None = None  # messages from the device in the round
    download_s: float | None = None  # the round's task and model reaching the device
    upload_s: float | None = None  # its update reaching the server
    train_s: float | None = None  # the device's own report from here to encode_s (protocol.DeviceReport)
    train_loss: float | None = None  # mean over the local epoch(s)
    train_loss_end: float | None = None  # the last quarter of its steps (where local training ended)
    train_acc: float | None = None  # on its training data
    epsilon: float | None = None  # differential privacy spent so far (DP runs)
    images_per_s: float | None = None  # training throughput
    resources: Mapping[str, Any] | None = None  # ResourceMonitor summary; `device` (see below)
    global_eval: Mapping[str, Any] | None = None  # the global model evaluated on the device's test split
    steps: int | None = None  # optimizer steps
    nonfinite: list[str] | None = None  # reported figures that were not finite
    set_state_s: float | None = None  # loading the round's tensors into the model
    encode_s: float | None = None  # encoding the update
    response_s: float | None = None  # from the round's opening to the update's arrival
    update_norm: float | None = None  # L2 distance of the update from the model it trained on
    norm_action: str | None = None  # "clipped" or "dropped" (train_args.max_update_norm), else null
    staleness: int | None = None  # async: global versions between its task and the aggregation
    staleness_weight: float | None = None  # async: the weight applied to its delta
    bytes_kind: str | None = None  # "wire" (MQTT packets) or "encoded" (frames of a simulate run)
    rank: int | None = None  # the LoRA rank the update was trained at (flexlora); absent otherwise


@dataclasses.dataclass(frozen=True, kw_only=True)
class RoundRecord(Record):
    """One round attempt: aggregated or failed, its drops per reason, bytes and the global model's evaluation."""

    KIND: ClassVar[str] = "round"
    OPTIONAL: ClassVar[frozenset[str]] = frozenset({"dropped_messages", "dropped_messages_coalesced"})
    round: int | None = None
    attempt: int | None = None  # the round's retry: 0 first, n after n failed attempts (both modes)
    status: str | None = None  # "aggregated" or "failed"
    selected: list[str] | None = None  # sync: the devices sampled; async: those aggregated
    accepted: int | None = None  # updates aggregated (0 when failed)
    dropped: Mapping[str, int] | None = None  # {DropReason value: count} of updates not aggregated
    bytes_down: int | None = None  # metered under this round's index (async: an older task's under its own)
    bytes_up: int | None = None  # metered under this round's index
    cum_bytes: int | None = None  # up + down of every round so far, failed attempts included
    round_s: float | None = None  # from opening to closing
    aggregate_s: float | None = None  # the aggregation's own time
    eval: Mapping[str, Any] | None = None  # the global model's {loss, top1, samples, ...}, or null
    devices_online: int | None = None  # when it closed
    mode: str | None = None  # "sync" or "async" (async: a round is one aggregation)
    bytes_kind: str | None = None  # "wire" (MQTT packets) or "encoded" (frames of a simulate run)
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
    device_id: str | None = None  # null: the global model
    metric: str | None = None  # train_loss_end, train_loss, top1 or eval_loss (server/records.py DivergenceWatch)
    value: Any = None  # the figure, or "non-finite"
    threshold: float | None = None  # the chance level it was judged against
    hint: str | None = None  # names train_args.learning_rate


@dataclasses.dataclass(frozen=True)
class DroppedMessage(Record):
    """A packet or message refused before it reached the round flow (transport or engine), or a sum of them
    (`count`; a record without it stands for one drop). Its fields may be given by position, in this order."""

    KIND: ClassVar[str] = "dropped_message"
    sender: str | None = None  # the node the topic names (claimed; unauthenticated unless the reason says so)
    topic: str | None = None  # null for a drop the engine decided
    reason: str = ""  # a DropReason value (fedpeft_edge/drops.py)
    detail: str = ""  # the error's message
    bytes: int | None = None  # payload bytes of what was dropped
    count: int = 1  # drops this record stands for (a full inbox, a summed window)

    def fields(self, always_count: bool = False) -> dict[str, Any]:
        out = super().fields()
        if isinstance(self.reason, enum.Enum):  # a DropReason: written as its value
            out["reason"] = self.reason.value
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
    final_top1: float | None = None  # the last aggregated round's evaluation
    best_top1: float | None = None
    final_perplexity: float | None = None  # causal LMs only
    best_perplexity: float | None = None  # causal LMs only
    bytes_down: int | None = None  # every round's, failed attempts included
    bytes_up: int | None = None  # every round's, failed attempts included
    bytes_total: int | None = None  # down + up
    bytes_per_round: float | None = None  # bytes_total per aggregated round
    shared_params: int | None = None  # PEFT parameters exchanged
    backbone_fingerprint: str | None = None  # of the frozen backbone (devices must match it)
    dropped: Mapping[str, int] | None = None  # {DropReason value: count} over all rounds
    end_reason: str | None = None  # "completed", or why the run ended early
    bytes_kind: str | None = None  # "wire" or "encoded"


METRICS_RECORDS: tuple[type[Record], ...] = (
    JoinRecord, AssignmentRecord, PresenceRecord, DeviceStatusRecord, DeviceErrorRecord, ResumeRecord,
    RoundOpenRecord, DeviceRoundRecord, RoundRecord, DivergenceRecord, DroppedMessage,
)
BY_KIND: dict[str, type[Record]] = {c.KIND: c for c in METRICS_RECORDS}


def parse_record(rec: Mapping[str, Any]) -> Record | None:
    """The typed record of one metrics.jsonl object, or None for a kind this version does not know."""
    cls = BY_KIND.get(str(rec.get("kind")))
    return cls.from_dict(rec) if cls is not None else None


SCHEMA_BEGIN = "<!-- records:begin (generated from fedpeft_edge/records.py by schema_markdown(); do not edit) -->"
SCHEMA_END = "<!-- records:end -->"
_OPTIONAL_NOTE = " (written only when set)"


def schema_markdown() -> str:
    """docs/design.md's record schema, generated from these classes: one table per record (its key, type and
    the comment beside its field). tests/unit/test_records.py fails when the doc and the classes differ."""
    parts = [SCHEMA_BEGIN]
    classes: tuple[type[Record], ...] = (*METRICS_RECORDS, RunSummary)
    for cls in classes:
        title = f"`metrics.jsonl` kind `{cls.KIND}`" if cls.KIND else "`summary.json`"
        doc = " ".join((cls.__doc__ or "").split())
        notes = _field_comments(cls)
        hints = {f.name: str(f.type).replace(" | None", "").replace(" | ", " or ") for f in dataclasses.fields(cls)}
        rows = [f"| `{n}` | `{hints[n]}` | {notes.get(n, '')}{_OPTIONAL_NOTE if n in cls.OPTIONAL else ''} |"
                for n in cls.field_names()]
        parts += ["", f"#### {title} ({cls.__name__})", doc, "", "| key | type | meaning |", "|---|---|---|", *rows]
    parts += ["", "Every metrics.jsonl record also has `kind` and `time` (epoch s, set when written).", SCHEMA_END]
    return "\n".join(parts)


def _field_comments(cls: type) -> dict[str, str]:
    """The `# comment` beside each field in the class's source (the field's meaning)."""
    out: dict[str, str] = {}
    tokens = tokenize.generate_tokens(io.StringIO(inspect.getsource(cls)).readline)
    line_field: dict[int, str] = {}
    for tok in tokens:
        if tok.type == tokenize.NAME and tok.start[1] == 4 and tok.start[0] not in line_field:
            line_field[tok.start[0]] = tok.string
        elif tok.type == tokenize.COMMENT and tok.start[0] in line_field:
            out[line_field[tok.start[0]]] = tok.string.lstrip("# ").strip()
    return out
