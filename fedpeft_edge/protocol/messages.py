"""One frozen dataclass per protocol message, with its params form; `parse` checks every field.

`to_params()` gives the message's FedML params (`msg_type`, `sender`, `receiver` and its fields: the dict a FedML
`Message` carries, built into one only by transport/); `from_params(params)` (or `parse(params, channel)`, which
dispatches on msg_type and refuses what the channel's sender may not send) turns received params back into the
typed object, raising ProtocolError naming the field, the value and the fix. No code outside this package reads
or writes a message key, and nothing here imports FedML.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar

import fedpeft_edge.protocol.keys as K
from fedpeft_edge.errors import ProtocolError
from fedpeft_edge.protocol.fields import (
    MAX_SAMPLES,
    check_blob,
    check_bool,
    check_choice,
    check_device_id,
    check_int,
    check_node_id,
    check_opt_int,
    check_opt_mapping,
    check_opt_number,
    check_opt_round,
    check_opt_text,
    check_round,
    check_server_id,
    check_text,
    fail,
    is_int,
)
from fedpeft_edge.protocol.report import DeviceReport
from fedpeft_edge.protocol.roles import WIRE_TYPES, Channel
from fedpeft_edge.wire.codec import TensorParts, blob_nbytes

MAX_BLOB_BYTES = 2**40  # a size field's bound (the transport bounds what actually arrives)
MAX_PROFILE_CHARS = 64 * 1024  # a join's device profile (join spam must not fill the run log)
MAX_DATA_STATS_CHARS = 256 * 1024
MAX_MANIFEST_CHARS = 4 * 1024 * 1024
ROUND_MODES = ("sync", "async")
MAX_CLASSES = 10_000  # class names in a join or join ack (ImageNet-21k-sized heads are out of scope)
MAX_CLASS_NAME_CHARS = 256
_HASH_CHARS = 128

T = TypeVar("T", bound="ProtocolMessage")


class ProtocolMessage:
    """Base of the typed messages: `msg_type` is FedML's id; subclasses define the fields."""

    msg_type: ClassVar[int]

    def to_params(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def from_params(cls: type[T], params: Mapping[str, Any]) -> T:
        raise NotImplementedError


def _new(msg_type: int, sender: str | int, receiver: str | int, **params: Any) -> dict[str, Any]:
    return {K.MSG_ARG_KEY_TYPE: msg_type, K.MSG_ARG_KEY_SENDER: sender, K.MSG_ARG_KEY_RECEIVER: receiver, **params}


def _params(params: Any) -> Mapping[str, Any]:
    if not isinstance(params, Mapping):
        raise fail("message", type(params).__name__, "is not a params mapping",
                   "pass the received message's params (transport/ unwraps FedML's Message)")
    return params


def check_opt_class_names(value: Any, field: str = K.MSG_ARG_KEY_CLASS_NAMES) -> tuple[str, ...] | None:
    """An optional list of distinct, non-empty class names (a data set's label order)."""
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or not 0 < len(value) <= MAX_CLASSES:
        raise fail(field, value, f"is not a list of 1 to {MAX_CLASSES} class names", "send the class names in "
                   "label order")
    names = tuple(check_text(v, field, MAX_CLASS_NAME_CHARS) for v in value)
    if "" in names or len(set(names)) != len(names):
        raise fail(field, value, "holds an empty or repeated class name", "send each class name once")
    return names


def _optional(key: str, value: Any) -> dict[str, Any]:
    """A parameter sent only when set, so that a peer of an earlier version sees the message it knows."""
    return {} if value is None else {key: value}


def _server_out(receiver: str | int) -> int:
    """Server -> device messages go from SERVER_ID to a device (int ids stay ints, as FedML ranks)."""
    check_device_id(receiver, "receiver")
    return K.SERVER_ID


# --- device -> server ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Join(ProtocolMessage):
    """A device announces itself (at start, after every reconnect and server restart)."""

    msg_type: ClassVar[int] = K.MSG_TYPE_C2S_JOIN
    sender: str
    backbone_fingerprint: str
    manifest_hash: str
    num_samples: int
    client_idx: int | None = None
    manifest: str | None = None
    profile: dict[str, Any] | None = None
    data_stats: dict[str, Any] | None = None
    epsilon: float | None = None
    client_status: str = K.STATUS_ONLINE
    class_names: tuple[str, ...] | None = None  # the device's label order (its data's class names)

    @property
    def exhausted(self) -> bool:
        return self.client_status == K.STATUS_BUDGET_EXHAUSTED

    def to_params(self) -> dict[str, Any]:
        return _new(self.msg_type, check_device_id(self.sender), K.SERVER_ID, **{
            K.MSG_ARG_KEY_DEVICE_ID: self.sender, K.MSG_ARG_KEY_CLIENT_INDEX: self.client_idx,
            K.MSG_ARG_KEY_BACKBONE_FINGERPRINT: self.backbone_fingerprint,
            K.MSG_ARG_KEY_MANIFEST_HASH: self.manifest_hash, K.MSG_ARG_KEY_MANIFEST: self.manifest,
            K.MSG_ARG_KEY_NUM_SAMPLES: self.num_samples, K.MSG_ARG_KEY_PROFILE: self.profile,
            K.MSG_ARG_KEY_DATA_STATS: self.data_stats, K.MSG_ARG_KEY_EPSILON: self.epsilon,
            K.MSG_ARG_KEY_CLIENT_STATUS: self.client_status,
            **_optional(K.MSG_ARG_KEY_CLASS_NAMES, None if self.class_names is None else list(self.class_names)),
        })

    @classmethod
    def from_params(cls, msg: Mapping[str, Any]) -> Join:
        p = _params(msg)
        return cls(
            sender=check_device_id(p.get(K.MSG_ARG_KEY_SENDER)),
            backbone_fingerprint=check_text(p.get(K.MSG_ARG_KEY_BACKBONE_FINGERPRINT),
                                            K.MSG_ARG_KEY_BACKBONE_FINGERPRINT, _HASH_CHARS),
            manifest_hash=check_text(p.get(K.MSG_ARG_KEY_MANIFEST_HASH), K.MSG_ARG_KEY_MANIFEST_HASH, _HASH_CHARS),
            num_samples=check_int(p.get(K.MSG_ARG_KEY_NUM_SAMPLES), K.MSG_ARG_KEY_NUM_SAMPLES, 1, MAX_SAMPLES),
            client_idx=check_opt_int(p.get(K.MSG_ARG_KEY_CLIENT_INDEX), K.MSG_ARG_KEY_CLIENT_INDEX, 0, 10**9),
            manifest=check_opt_text(p.get(K.MSG_ARG_KEY_MANIFEST), K.MSG_ARG_KEY_MANIFEST, MAX_MANIFEST_CHARS),
            profile=check_opt_mapping(p.get(K.MSG_ARG_KEY_PROFILE), K.MSG_ARG_KEY_PROFILE, MAX_PROFILE_CHARS),
            data_stats=check_opt_mapping(p.get(K.MSG_ARG_KEY_DATA_STATS), K.MSG_ARG_KEY_DATA_STATS,
                                         MAX_DATA_STATS_CHARS),
            epsilon=check_opt_number(p.get(K.MSG_ARG_KEY_EPSILON), K.MSG_ARG_KEY_EPSILON, 0.0),
            client_status=check_choice(p.get(K.MSG_ARG_KEY_CLIENT_STATUS, K.STATUS_ONLINE),
                                       K.MSG_ARG_KEY_CLIENT_STATUS, (K.STATUS_ONLINE, K.STATUS_BUDGET_EXHAUSTED)),
            class_names=check_opt_class_names(p.get(K.MSG_ARG_KEY_CLASS_NAMES)),
        )


@dataclasses.dataclass(frozen=True)
class Update(ProtocolMessage):
    """A device's trained tensors for one round, with what it measured (DeviceReport)."""

    msg_type: ClassVar[int] = K.MSG_TYPE_C2S_SEND_MODEL_TO_SERVER
    sender: str
    round: int
    num_samples: int
    blob: bytes | memoryview | TensorParts
    report: DeviceReport = dataclasses.field(default_factory=DeviceReport)
    manifest_hash: str | None = None
    encoding: str | None = None
    is_delta: bool = False  # informational: the server takes is_delta from train_args.send_delta
    model_version: int | None = None  # the global model version the device trained from (async staleness)
    msg_id: str | None = None
    sent_at: float | None = None

    def to_params(self) -> dict[str, Any]:
        params: dict[str, Any] = {
            K.MSG_ARG_KEY_ROUND: self.round, K.MSG_ARG_KEY_NUM_SAMPLES: self.num_samples,
            K.MSG_ARG_KEY_MANIFEST_HASH: self.manifest_hash, K.MSG_ARG_KEY_ENCODING: self.encoding,
            K.MSG_ARG_KEY_IS_DELTA: self.is_delta, K.MSG_ARG_KEY_METRICS: self.report.to_dict(),
            K.MSG_ARG_KEY_MODEL_PARAMS: self.blob,
            K.MSG_ARG_KEY_SENT_AT: self.sent_at if self.sent_at is not None else time.time(),
        }
        if self.model_version is not None:
            params[K.MSG_ARG_KEY_MODEL_VERSION] = self.model_version
        if self.msg_id is not None:
            params[K.MSG_ARG_KEY_MSG_ID] = self.msg_id
        return _new(self.msg_type, check_device_id(self.sender), K.SERVER_ID, **params)

    @classmethod
    def from_params(cls, msg: Mapping[str, Any]) -> Update:
        p = _params(msg)
        blob = p.get(K.MSG_ARG_KEY_MODEL_PARAMS)
        if blob is None:
            raise fail(K.MSG_ARG_KEY_MODEL_PARAMS, None, "is missing: the update carries no tensors",
                       "send the encoded tensors as the message's blob")
        return cls(
            sender=check_device_id(p.get(K.MSG_ARG_KEY_SENDER)),
            round=check_round(p.get(K.MSG_ARG_KEY_ROUND)),
            num_samples=check_int(p.get(K.MSG_ARG_KEY_NUM_SAMPLES), K.MSG_ARG_KEY_NUM_SAMPLES, 1, MAX_SAMPLES),
            blob=check_blob(blob, K.MSG_ARG_KEY_MODEL_PARAMS),
            report=DeviceReport.from_dict(p.get(K.MSG_ARG_KEY_METRICS)),
            manifest_hash=check_opt_text(p.get(K.MSG_ARG_KEY_MANIFEST_HASH), K.MSG_ARG_KEY_MANIFEST_HASH,
                                         _HASH_CHARS),
            encoding=check_opt_text(p.get(K.MSG_ARG_KEY_ENCODING), K.MSG_ARG_KEY_ENCODING, 32),
            is_delta=check_bool(p.get(K.MSG_ARG_KEY_IS_DELTA, False), K.MSG_ARG_KEY_IS_DELTA),
            model_version=check_opt_int(p.get(K.MSG_ARG_KEY_MODEL_VERSION), K.MSG_ARG_KEY_MODEL_VERSION, 0,
                                        10**9),
            msg_id=check_opt_text(p.get(K.MSG_ARG_KEY_MSG_ID), K.MSG_ARG_KEY_MSG_ID, 128),
            sent_at=check_opt_number(p.get(K.MSG_ARG_KEY_SENT_AT), K.MSG_ARG_KEY_SENT_AT, 0.0),
        )


@dataclasses.dataclass(frozen=True)
class DeviceErrorReport(ProtocolMessage):
    """A device failed a round; the round goes on without it."""

    msg_type: ClassVar[int] = K.MSG_TYPE_C2S_ERROR
    sender: str
    round: int | None
    error: str

    def to_params(self) -> dict[str, Any]:
        return _new(self.msg_type, check_device_id(self.sender), K.SERVER_ID, **{
            K.MSG_ARG_KEY_ROUND: self.round, K.MSG_ARG_KEY_ERROR: self.error[:4000]})

    @classmethod
    def from_params(cls, msg: Mapping[str, Any]) -> DeviceErrorReport:
        p = _params(msg)
        return cls(sender=check_device_id(p.get(K.MSG_ARG_KEY_SENDER)),
                   round=check_opt_round(p.get(K.MSG_ARG_KEY_ROUND)),
                   error=check_text(p.get(K.MSG_ARG_KEY_ERROR), K.MSG_ARG_KEY_ERROR))


@dataclasses.dataclass(frozen=True)
class ClientStatus(ProtocolMessage):
    """A device's status change (FedML's C2S_CLIENT_STATUS): today only BUDGET_EXHAUSTED."""

    msg_type: ClassVar[int] = K.MSG_TYPE_C2S_CLIENT_STATUS
    sender: str
    status: str
    round: int | None = None
    epsilon: float | None = None

    @property
    def exhausted(self) -> bool:
        return self.status == K.STATUS_BUDGET_EXHAUSTED

    def to_params(self) -> dict[str, Any]:
        return _new(self.msg_type, check_device_id(self.sender), K.SERVER_ID, **{
            K.MSG_ARG_KEY_CLIENT_STATUS: self.status, K.MSG_ARG_KEY_ROUND: self.round,
            K.MSG_ARG_KEY_EPSILON: self.epsilon})

    @classmethod
    def from_params(cls, msg: Mapping[str, Any]) -> ClientStatus:
        p = _params(msg)
        return cls(sender=check_device_id(p.get(K.MSG_ARG_KEY_SENDER)),
                   status=check_choice(p.get(K.MSG_ARG_KEY_CLIENT_STATUS), K.MSG_ARG_KEY_CLIENT_STATUS,
                                       (K.STATUS_ONLINE, K.STATUS_BUDGET_EXHAUSTED)),
                   round=check_opt_round(p.get(K.MSG_ARG_KEY_ROUND)),
                   epsilon=check_opt_number(p.get(K.MSG_ARG_KEY_EPSILON), K.MSG_ARG_KEY_EPSILON, 0.0))


# --- server -> device ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class JoinAck(ProtocolMessage):
    """The server accepts or refuses a join (with the reason and the fix)."""

    msg_type: ClassVar[int] = K.MSG_TYPE_S2C_JOIN_ACK
    receiver: str
    accepted: bool
    reason: str | None = None
    class_names: tuple[str, ...] | None = None  # the run's label order: a device maps its classes by name

    def to_params(self) -> dict[str, Any]:
        return _new(self.msg_type, _server_out(self.receiver), self.receiver, **{
            K.MSG_ARG_KEY_ACCEPTED: self.accepted, K.MSG_ARG_KEY_REASON: self.reason,
            **_optional(K.MSG_ARG_KEY_CLASS_NAMES, None if self.class_names is None else list(self.class_names))})

    @classmethod
    def from_params(cls, msg: Mapping[str, Any]) -> JoinAck:
        p = _params(msg)
        check_server_id(p.get(K.MSG_ARG_KEY_SENDER))
        return cls(receiver=check_node_id(p.get(K.MSG_ARG_KEY_RECEIVER), "receiver"),
                   accepted=check_bool(p.get(K.MSG_ARG_KEY_ACCEPTED), K.MSG_ARG_KEY_ACCEPTED),
                   reason=check_opt_text(p.get(K.MSG_ARG_KEY_REASON), K.MSG_ARG_KEY_REASON),
                   class_names=check_opt_class_names(p.get(K.MSG_ARG_KEY_CLASS_NAMES)))


@dataclasses.dataclass(frozen=True)
class RoundTask(ProtocolMessage):
    """The server hands a device the global tensors for a round (FedML's S2C_SYNC_MODEL_TO_CLIENT).

    With shared delivery (`model_id` set) the blob is empty: the tensors come in the SharedModel message of that
    id, `model_bytes` long, published once for every device.

    A sync task carries its round's `retry` (0 first, n after n failed attempts of the round), an async task its
    own `task_number` (a re-sent task is a new one); the other is 0. Both travel under the one wire key
    `attempt` (the frame format of earlier versions): the task's `mode` says which of the two it is.
    """

    msg_type: ClassVar[int] = K.MSG_TYPE_S2C_SYNC_MODEL_TO_CLIENT
    receiver: str
    round: int
    blob: bytes | memoryview | TensorParts
    manifest_hash: str
    encoding: str
    deadline: float | None = None  # wall clock (time.time()) by which the update must arrive
    retry: int = 0  # sync: failed attempts of this round before this one
    task_number: int = 0  # async: this task's own number
    evaluate: bool = False  # evaluate the received global model on the local test split first
    model_version: int | None = None  # async: the version of the global model in the blob
    mode: str = "sync"
    sent_at: float | None = None
    model_id: str | None = None  # shared delivery: the SharedModel message that carries the tensors
    model_bytes: int | None = None  # ... and its encoded size
    rank: int | None = None  # the rank the device trains and sends at (peft/shapes.py); None: the manifest's

    @property
    def awaits_model(self) -> bool:
        """The tensors are not in this task but in the shared model message `model_id`."""
        return self.model_id is not None and not blob_nbytes(self.blob)

    def to_params(self) -> dict[str, Any]:
        params: dict[str, Any] = {
            K.MSG_ARG_KEY_ROUND: self.round, K.MSG_ARG_KEY_ATTEMPT: self._wire_attempt(),
            K.MSG_ARG_KEY_MANIFEST_HASH: self.manifest_hash, K.MSG_ARG_KEY_ENCODING: self.encoding,
            K.MSG_ARG_KEY_DEADLINE: self.deadline, K.MSG_ARG_KEY_CONFIG: {K.CONFIG_KEY_EVALUATE: self.evaluate},
            K.MSG_ARG_KEY_MODE: self.mode,
            K.MSG_ARG_KEY_SENT_AT: self.sent_at if self.sent_at is not None else time.time(),
        }
        if self.awaits_model:
            params[K.MSG_ARG_KEY_MODEL_ID] = self.model_id
            params[K.MSG_ARG_KEY_MODEL_BYTES] = self.model_bytes
        else:
            params[K.MSG_ARG_KEY_MODEL_PARAMS] = self.blob
        if self.model_version is not None:
            params[K.MSG_ARG_KEY_MODEL_VERSION] = self.model_version
        if self.rank is not None:
            params[K.MSG_ARG_KEY_RANK] = self.rank
        return _new(self.msg_type, _server_out(self.receiver), self.receiver, **params)

    def _wire_attempt(self) -> int:
        """The one number the `attempt` key carries: the retry of a sync task, the number of an async one."""
        if self.mode == "async":
            number, (unsent, value) = self.task_number, ("retry", self.retry)
        else:
            number, (unsent, value) = self.retry, ("task_number", self.task_number)
        if value:
            raise ValueError(f"a {self.mode} round task with {unsent}={value}: its wire form cannot carry it; give "
                             "sync tasks a retry, async ones a task_number")
        return number

    def with_model(self, model: SharedModel) -> RoundTask:
        """This task with the tensors of the shared model it names (ProtocolError if `model` is another one)."""
        if model.model_id != self.model_id or model.round != self.round:
            raise fail(K.MSG_ARG_KEY_MODEL_ID, model.model_id, f"is not the model of this task ({self.model_id}, "
                       f"round {self.round})", "wait for the model the task names")
        got = blob_nbytes(model.blob)
        if self.model_bytes is not None and got != self.model_bytes:
            raise fail(K.MSG_ARG_KEY_MODEL_BYTES, got, f"differs from the task's {self.model_bytes}",
                       "the server sent a different model under this id: it is refused")
        return dataclasses.replace(self, blob=model.blob, manifest_hash=model.manifest_hash,
                                   encoding=model.encoding)

    @classmethod
    def from_params(cls, msg: Mapping[str, Any]) -> RoundTask:
        p = _params(msg)
        check_server_id(p.get(K.MSG_ARG_KEY_SENDER))
        config = check_opt_mapping(p.get(K.MSG_ARG_KEY_CONFIG), K.MSG_ARG_KEY_CONFIG, 4096) or {}
        evaluate = config.get(K.CONFIG_KEY_EVALUATE, False)
        blob = p.get(K.MSG_ARG_KEY_MODEL_PARAMS)
        model_id = check_opt_text(p.get(K.MSG_ARG_KEY_MODEL_ID), K.MSG_ARG_KEY_MODEL_ID, 64)
        if (blob is None) == (model_id is None):
            raise fail(K.MSG_ARG_KEY_MODEL_PARAMS, type(blob).__name__, f"and {K.MSG_ARG_KEY_MODEL_ID} "
                       f"{model_id!r}: a round task carries its tensors or names the shared model, one of the two",
                       "send the global tensors as the message's blob, or a model_id with no blob")
        mode = check_choice(p.get(K.MSG_ARG_KEY_MODE, "sync"), K.MSG_ARG_KEY_MODE, ROUND_MODES)
        is_async = mode == "async"  # the one key carries the async task's number, else the sync round's retry
        # an async run numbers every task it hands out: a long one passes a million (a sync retry stays small)
        attempt = check_int(p.get(K.MSG_ARG_KEY_ATTEMPT, 0), K.MSG_ARG_KEY_ATTEMPT, 0, 2**53 if is_async else 10**6)
        return cls(
            receiver=check_node_id(p.get(K.MSG_ARG_KEY_RECEIVER), "receiver"),
            round=check_round(p.get(K.MSG_ARG_KEY_ROUND)),
            blob=check_blob(blob, K.MSG_ARG_KEY_MODEL_PARAMS) if blob is not None else b"",
            model_id=model_id,
            model_bytes=check_opt_int(p.get(K.MSG_ARG_KEY_MODEL_BYTES), K.MSG_ARG_KEY_MODEL_BYTES, 1,
                                      MAX_BLOB_BYTES) if model_id is not None else None,
            manifest_hash=check_text(p.get(K.MSG_ARG_KEY_MANIFEST_HASH), K.MSG_ARG_KEY_MANIFEST_HASH, _HASH_CHARS),
            encoding=check_text(p.get(K.MSG_ARG_KEY_ENCODING), K.MSG_ARG_KEY_ENCODING, 32),
            deadline=check_opt_number(p.get(K.MSG_ARG_KEY_DEADLINE), K.MSG_ARG_KEY_DEADLINE, 0.0),
            retry=0 if is_async else attempt, task_number=attempt if is_async else 0,
            evaluate=check_bool(evaluate, f"{K.MSG_ARG_KEY_CONFIG}.{K.CONFIG_KEY_EVALUATE}"),
            model_version=check_opt_int(p.get(K.MSG_ARG_KEY_MODEL_VERSION), K.MSG_ARG_KEY_MODEL_VERSION, 0,
                                        10**9),
            mode=mode,
            sent_at=check_opt_number(p.get(K.MSG_ARG_KEY_SENT_AT), K.MSG_ARG_KEY_SENT_AT, 0.0),
            rank=check_opt_int(p.get(K.MSG_ARG_KEY_RANK), K.MSG_ARG_KEY_RANK, 1, 2**20),
        )


RoundSync = RoundTask  # FedML's name for the same message


@dataclasses.dataclass(frozen=True)
class SharedModel(ProtocolMessage):
    """comm_args.model_delivery "shared": a round's global tensors, published once for every device on the
    run's model topic; the round's tasks name it by `model_id`. Signed by the server like any of its messages."""

    msg_type: ClassVar[int] = K.MSG_TYPE_S2C_MODEL
    model_id: str
    round: int
    blob: bytes | memoryview | TensorParts
    manifest_hash: str
    encoding: str
    model_version: int | None = None

    def to_params(self) -> dict[str, Any]:
        params: dict[str, Any] = {
            K.MSG_ARG_KEY_MODEL_ID: check_text(self.model_id, K.MSG_ARG_KEY_MODEL_ID, 64),
            K.MSG_ARG_KEY_ROUND: self.round, K.MSG_ARG_KEY_MANIFEST_HASH: self.manifest_hash,
            K.MSG_ARG_KEY_ENCODING: self.encoding, K.MSG_ARG_KEY_MODEL_PARAMS: self.blob,
        }
        if self.model_version is not None:
            params[K.MSG_ARG_KEY_MODEL_VERSION] = self.model_version
        return _new(self.msg_type, K.SERVER_ID, K.BROADCAST, **params)

    @classmethod
    def from_params(cls, msg: Mapping[str, Any]) -> SharedModel:
        p = _params(msg)
        check_server_id(p.get(K.MSG_ARG_KEY_SENDER))
        if p.get(K.MSG_ARG_KEY_RECEIVER) != K.BROADCAST:
            raise fail("receiver", p.get(K.MSG_ARG_KEY_RECEIVER), "is not the broadcast receiver",
                       f"address a shared model to {K.BROADCAST!r}")
        blob = p.get(K.MSG_ARG_KEY_MODEL_PARAMS)
        if blob is None:
            raise fail(K.MSG_ARG_KEY_MODEL_PARAMS, None, "is missing: the shared model carries no tensors",
                       "send the global tensors as the message's blob")
        return cls(
            model_id=check_text(p.get(K.MSG_ARG_KEY_MODEL_ID), K.MSG_ARG_KEY_MODEL_ID, 64),
            round=check_round(p.get(K.MSG_ARG_KEY_ROUND)),
            blob=check_blob(blob, K.MSG_ARG_KEY_MODEL_PARAMS),
            manifest_hash=check_text(p.get(K.MSG_ARG_KEY_MANIFEST_HASH), K.MSG_ARG_KEY_MANIFEST_HASH, _HASH_CHARS),
            encoding=check_text(p.get(K.MSG_ARG_KEY_ENCODING), K.MSG_ARG_KEY_ENCODING, 32),
            model_version=check_opt_int(p.get(K.MSG_ARG_KEY_MODEL_VERSION), K.MSG_ARG_KEY_MODEL_VERSION, 0,
                                        10**9),
        )


@dataclasses.dataclass(frozen=True)
class Finish(ProtocolMessage):
    """The run is over: the device stops."""

    msg_type: ClassVar[int] = K.MSG_TYPE_S2C_FINISH
    receiver: str
    reason: str | None = None

    def to_params(self) -> dict[str, Any]:
        return _new(self.msg_type, _server_out(self.receiver), self.receiver, **{K.MSG_ARG_KEY_REASON: self.reason})

    @classmethod
    def from_params(cls, msg: Mapping[str, Any]) -> Finish:
        p = _params(msg)
        check_server_id(p.get(K.MSG_ARG_KEY_SENDER))
        return cls(receiver=check_node_id(p.get(K.MSG_ARG_KEY_RECEIVER), "receiver"),
                   reason=check_opt_text(p.get(K.MSG_ARG_KEY_REASON), K.MSG_ARG_KEY_REASON))


MESSAGE_CLASSES: dict[int, type[ProtocolMessage]] = {
    c.msg_type: c for c in (Join, Update, DeviceErrorReport, ClientStatus, JoinAck, RoundTask, SharedModel, Finish)
}  # wire messages only: local events (events.py) have no wire form
DEVICE_MESSAGES = (Join, Update, DeviceErrorReport, ClientStatus)  # what a device may send the server
SERVER_MESSAGES = (JoinAck, RoundTask, SharedModel, Finish)  # what the server may send a device


def parse(params: Any, channel: Channel) -> ProtocolMessage:
    """The typed form of a message's params received on `channel`: only a type its sender's role may send there
    (roles.WIRE_TYPES); ProtocolError (naming field, value, fix) if it is malformed or not allowed."""
    p = _params(params)
    msg_type = p.get(K.MSG_ARG_KEY_TYPE)
    if isinstance(msg_type, str) and msg_type.isdigit():
        msg_type = int(msg_type)  # FedML's Message keeps str(type) in .type; the params keep the int
    allowed = WIRE_TYPES[channel]
    if not is_int(msg_type) or msg_type not in allowed:
        raise fail(K.MSG_ARG_KEY_TYPE, msg_type, f"is not a message type allowed on the {channel.value} channel",
                   f"send one of {sorted(allowed)}")
    try:
        return MESSAGE_CLASSES[msg_type].from_params(p)
    except ProtocolError:
        raise
    except (TypeError, ValueError, AttributeError) as exc:  # a shape no check anticipated: still a bad message
        raise ProtocolError(f"message type {msg_type} is malformed ({type(exc).__name__}: {exc}); "
                            "send the fields docs/design.md lists for it") from exc


def sender_of(params: Any) -> str | None:
    """The claimed sender of raw params if it is a plausible node id (for drop records), else None."""
    try:
        return check_node_id(_params(params).get(K.MSG_ARG_KEY_SENDER))
    except ProtocolError:
        return None
