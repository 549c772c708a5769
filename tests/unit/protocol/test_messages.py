"""Typed protocol messages: round trips through their params, and parsing refuses every bad field."""

from __future__ import annotations

import contextlib
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedpeft_edge.errors import ProtocolError
from fedpeft_edge.protocol import (
    LOCAL_EVENTS,
    MESSAGE_CLASSES,
    ClientStatus,
    ConnectionReady,
    DeviceErrorReport,
    DeviceReport,
    EvalReport,
    Finish,
    Join,
    JoinAck,
    LocalEvent,
    Presence,
    ProtocolMessage,
    RoundTask,
    SharedModel,
    Throttled,
    Timer,
    Update,
    parse,
)
from fedpeft_edge.protocol import keys as K
from fedpeft_edge.protocol.roles import WIRE_TYPES, Channel

REPORT = DeviceReport(train_loss=0.5, train_acc=0.9, steps=3, samples_seen=48, train_s=1.5, epsilon=0.7,
                      resources={"cpu": {"user_s": 1.0}}, global_eval=EvalReport(0.4, 0.8, 20, "torch", 0.1))
SAMPLES = [
    Join(sender="dev1", backbone_fingerprint="f" * 64, manifest_hash="h" * 64, num_samples=120, client_idx=1,
         manifest="{}", profile={"cpu": "x"}, data_stats={"num_train": 120}, epsilon=None),
    Update(sender="dev1", round=3, num_samples=120, blob=b"\x00\x01", report=REPORT, manifest_hash="h" * 64,
           encoding="fp32", model_version=2, msg_id="abc", sent_at=1.0),
    DeviceErrorReport(sender="dev1", round=2, error="TrainingError: boom"),
    ClientStatus(sender="dev1", status=K.STATUS_BUDGET_EXHAUSTED, round=4, epsilon=3.0),
    JoinAck(receiver="dev1", accepted=False, reason="different backbone"),
    Join(sender="dev2", backbone_fingerprint="f" * 64, manifest_hash="h" * 64, num_samples=3,
         class_names=("cat", "dog")),
    JoinAck(receiver="dev2", accepted=True, class_names=("bird", "cat", "dog")),
    RoundTask(receiver="dev1", round=1, blob=b"xyz", manifest_hash="h" * 64, encoding="fp32", deadline=5.0,
              task_number=1, evaluate=True, model_version=0, mode="async", sent_at=2.0, rank=2),
    Finish(receiver="dev1", reason="completed"),
]


def _parse(msg: Any) -> Any:
    """parse() on the channel its sender's role sends that type on (what the transports pass)."""
    msg_type = msg.get(K.MSG_ARG_KEY_TYPE) if isinstance(msg, dict) else None
    channel = next((c for c, types in WIRE_TYPES.items() if isinstance(msg_type, int) and msg_type in types),
                   Channel.DEVICE_TO_SERVER)
    return parse(msg, channel)


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_every_message_round_trips_through_a_fedml_message(msg: Any) -> None:
    assert _parse(msg.to_params()) == msg


def test_a_tasks_retry_or_number_travels_under_the_one_attempt_key() -> None:
    base = dict(receiver="dev1", round=4, blob=b"xyz", manifest_hash="h" * 64, encoding="fp32", sent_at=1.0)
    sync, unsync = RoundTask(**base, retry=2), RoundTask(**base, task_number=7, mode="async")  # type: ignore[arg-type]
    assert sync.to_params()[K.MSG_ARG_KEY_ATTEMPT] == 2 and unsync.to_params()[K.MSG_ARG_KEY_ATTEMPT] == 7
    assert _parse(sync.to_params()) == sync and _parse(unsync.to_params()) == unsync
    with pytest.raises(ValueError, match="task_number=3"):
        RoundTask(**base, task_number=3).to_params()  # type: ignore[arg-type]
    long_run = RoundTask(**base, task_number=5_000_000, mode="async")  # type: ignore[arg-type]
    assert _parse(long_run.to_params()) == long_run, "a long async run numbers more than a million tasks"


def _update_params(**override: Any) -> dict[str, Any]:
    msg = SAMPLES[1].to_params()
    for k, v in override.items():
        msg[k] = v
    return msg


@pytest.mark.parametrize("key,value,named", [
    (K.MSG_ARG_KEY_TYPE, [3], "msg_type"),
    (K.MSG_ARG_KEY_TYPE, 999, "msg_type"),
    (K.MSG_ARG_KEY_SENDER, "0", "reserved"),
    (K.MSG_ARG_KEY_SENDER, 0, "reserved"),
    (K.MSG_ARG_KEY_SENDER, "a/b", "sender"),
    (K.MSG_ARG_KEY_SENDER, ["x"], "sender"),
    (K.MSG_ARG_KEY_ROUND, -1, "round_idx"),
    (K.MSG_ARG_KEY_ROUND, True, "round_idx"),
    (K.MSG_ARG_KEY_ROUND, "3", "round_idx"),
    (K.MSG_ARG_KEY_NUM_SAMPLES, 0, "num_samples"),
    (K.MSG_ARG_KEY_NUM_SAMPLES, 10**12, "num_samples"),
    (K.MSG_ARG_KEY_NUM_SAMPLES, 1.5, "num_samples"),
    (K.MSG_ARG_KEY_METRICS, {"train_loss": math.nan}, "train_loss"),
    (K.MSG_ARG_KEY_METRICS, {"train_loss": math.inf}, "train_loss"),
    (K.MSG_ARG_KEY_METRICS, {"resources": {"a": math.nan}}, "resources.a"),
    (K.MSG_ARG_KEY_METRICS, [1, 2], "metrics"),
    (K.MSG_ARG_KEY_MODEL_PARAMS, "not bytes", "model_params"),
    (K.MSG_ARG_KEY_MODEL_PARAMS, None, "model_params"),
])
def test_a_bad_update_field_is_a_protocol_error_naming_it(key: str, value: Any, named: str) -> None:
    with pytest.raises(ProtocolError, match=named):
        _parse(_update_params(**{key: value}))


def test_deep_nesting_and_huge_values_are_refused() -> None:
    deep: Any = 1
    for _ in range(50):
        deep = {"a": deep}
    with pytest.raises(ProtocolError, match="deeper"):
        _parse(_update_params(**{K.MSG_ARG_KEY_METRICS: {"resources": deep}}))
    big = SAMPLES[0].to_params()
    big[K.MSG_ARG_KEY_PROFILE] = {"blob": "x" * 100_000}
    with pytest.raises(ProtocolError, match="profile"):
        _parse(big)


def test_class_names_are_optional_on_the_wire_and_checked() -> None:
    """A join or ack without class names is what an earlier version sends (and gets); bad lists are refused."""
    plain = SAMPLES[0].to_params()
    assert K.MSG_ARG_KEY_CLASS_NAMES not in plain
    assert _parse(plain).class_names is None
    for bad in ("cat", [], ["cat", "cat"], ["cat", ""], [1, 2], ["x" * 300]):
        msg = SAMPLES[0].to_params()
        msg[K.MSG_ARG_KEY_CLASS_NAMES] = bad
        with pytest.raises(ProtocolError, match="class_names"):
            _parse(msg)


def test_server_messages_must_come_from_the_server() -> None:
    msg = SAMPLES[4].to_params()
    msg[K.MSG_ARG_KEY_SENDER] = "dev2"
    with pytest.raises(ProtocolError, match="not the server"):
        _parse(msg)


def test_a_device_cannot_be_sent_to_as_the_server() -> None:
    with pytest.raises(ProtocolError, match="reserved"):
        JoinAck(receiver="0", accepted=True).to_params()


def test_non_finite_device_metrics_travel_as_null_and_are_named() -> None:
    report = DeviceReport(train_loss=math.nan, train_s=1.0)
    got = _parse(Update(sender="d", round=1, num_samples=1, blob=b"x", report=report).to_params())
    assert isinstance(got, Update)
    assert got.report.train_loss is None and got.report.nonfinite == ("train_loss",)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=30,
)


@settings(max_examples=400, deadline=None)
@given(params=st.dictionaries(st.sampled_from(
    [K.MSG_ARG_KEY_TYPE, K.MSG_ARG_KEY_SENDER, K.MSG_ARG_KEY_RECEIVER, K.MSG_ARG_KEY_ROUND,
     K.MSG_ARG_KEY_NUM_SAMPLES, K.MSG_ARG_KEY_METRICS, K.MSG_ARG_KEY_MODEL_PARAMS, K.MSG_ARG_KEY_PROFILE,
     K.MSG_ARG_KEY_BACKBONE_FINGERPRINT, K.MSG_ARG_KEY_MANIFEST_HASH, K.MSG_ARG_KEY_CONFIG,
     K.MSG_ARG_KEY_PRESENCE, K.MSG_ARG_KEY_TIMER, K.MSG_ARG_KEY_ERROR, K.MSG_ARG_KEY_CLIENT_STATUS]),
    _json | st.binary(max_size=8) | st.sampled_from([0, 2, 3, 5, 7, 101, 102, 103, 104, 105]), max_size=12))
def test_parsing_arbitrary_params_raises_only_protocol_errors(params: dict[str, Any]) -> None:
    with contextlib.suppress(ProtocolError):
        _parse(params)


def test_device_round_fields_keep_the_devices_timings() -> None:
    # set_state_s and encode_s are part of a device's compute (the lab's efficiency): the record keeps them
    rep = DeviceReport(train_s=1.5, set_state_s=0.12, encode_s=0.03, download_s=1.2)
    fields = rep.record_fields()
    assert (fields["set_state_s"], fields["encode_s"], fields["train_s"]) == (0.12, 0.03, 1.5)
    back = DeviceReport.from_record(fields)
    assert (back.set_state_s, back.encode_s, back.train_s, back.download_s) == (0.12, 0.03, 1.5, 1.2)


def test_shared_model_and_a_task_naming_it_round_trip() -> None:
    m = SharedModel(model_id="abc", round=3, blob=b"\x01\x02", manifest_hash="h", encoding="fp32", model_version=2)
    assert m.to_params()[K.MSG_ARG_KEY_RECEIVER] == K.BROADCAST
    back = _parse(m.to_params())
    assert isinstance(back, SharedModel) and back.model_id == "abc" and bytes(back.blob) == b"\x01\x02"
    t = RoundTask(receiver="d1", round=3, blob=b"", manifest_hash="h", encoding="fp32", model_id="abc",
                  model_bytes=2)
    got = _parse(t.to_params())
    assert isinstance(got, RoundTask) and got.awaits_model and got.model_id == "abc" and got.model_bytes == 2
    assert bytes(got.with_model(back).blob) == b"\x01\x02"


def test_a_task_with_both_or_neither_tensors_and_model_id_is_refused() -> None:
    t = RoundTask(receiver="d1", round=3, blob=b"\x01", manifest_hash="h", encoding="fp32").to_params()
    t[K.MSG_ARG_KEY_MODEL_ID] = "abc"
    with pytest.raises(ProtocolError, match="model_id"):
        _parse(t)
    bare = RoundTask(receiver="d1", round=3, blob=b"\x01", manifest_hash="h", encoding="fp32").to_params()
    del bare[K.MSG_ARG_KEY_MODEL_PARAMS]
    with pytest.raises(ProtocolError, match="one of the two"):
        _parse(bare)
    m = SharedModel(model_id="abc", round=3, blob=b"\x01", manifest_hash="h", encoding="fp32").to_params()
    m[K.MSG_ARG_KEY_RECEIVER] = "d1"
    with pytest.raises(ProtocolError, match="broadcast"):
        _parse(m)


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_a_message_parses_only_on_the_channels_its_senders_role_may_use(msg: Any) -> None:
    for channel, types in WIRE_TYPES.items():
        if msg.msg_type in types:
            assert parse(msg.to_params(), channel) == msg
        else:
            with pytest.raises(ProtocolError, match=f"not a message type allowed on the {channel.value} channel"):
                parse(msg.to_params(), channel)


EVENTS = [Timer(name="deadline", round=2, retry=0), ConnectionReady("dev1"),
          Presence(node="dev1", online=False, since=3.5), Throttled(node="dev1", packets=7)]


def test_every_local_event_type_is_checked_for_a_wire_form() -> None:
    assert {type(e) for e in EVENTS} == set(LOCAL_EVENTS)


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: type(e).__name__)
def test_local_events_have_no_wire_form(event: LocalEvent) -> None:
    assert not isinstance(event, ProtocolMessage)
    assert not hasattr(event, "to_params") and not hasattr(type(event), "from_params")
    assert not hasattr(event, "msg_type")
    for old_type in (K.MSG_TYPE_LOCAL_TIMER, K.MSG_TYPE_PRESENCE, K.MSG_TYPE_CONNECTION_IS_READY):
        assert old_type not in MESSAGE_CLASSES
        for channel in Channel:  # a frame claiming one of the old local ids parses on no channel
            msg = {K.MSG_ARG_KEY_TYPE: old_type, K.MSG_ARG_KEY_SENDER: "dev1", K.MSG_ARG_KEY_RECEIVER: K.SERVER_ID,
                   K.MSG_ARG_KEY_TIMER: "deadline"}
            with pytest.raises(ProtocolError, match="not a message type allowed"):
                parse(msg, channel)
