"""Typed protocol messages: round trips through FedML's Message, and parsing refuses every bad field."""

from __future__ import annotations

import contextlib
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedpeft_edge.errors import ProtocolError
from fedpeft_edge.protocol import (
    ClientStatus,
    DeviceErrorReport,
    DeviceReport,
    EvalReport,
    Finish,
    Join,
    JoinAck,
    Presence,
    RoundTask,
    SharedModel,
    Timer,
    Update,
    parse,
)
from fedpeft_edge.protocol import keys as K
from fedpeft_edge.transport.fedml import Message

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
    RoundTask(receiver="dev1", round=1, blob=b"xyz", manifest_hash="h" * 64, encoding="fp32", deadline=5.0,
              attempt=1, evaluate=True, model_version=0, mode="async", sent_at=2.0, rank=2),
    Finish(receiver="dev1", reason="completed"),
    Presence(node="dev1", online=False, since=3.5),
    Timer(name="deadline", round=2, attempt=0),
]


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_every_message_round_trips_through_a_fedml_message(msg: Any) -> None:
    assert parse(msg.to_message()) == msg


def _update_params(**override: Any) -> Message:
    msg = SAMPLES[1].to_message()
    for k, v in override.items():
        msg.add_params(k, v)
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
        parse(_update_params(**{key: value}))


def test_deep_nesting_and_huge_values_are_refused() -> None:
    deep: Any = 1
    for _ in range(50):
        deep = {"a": deep}
    with pytest.raises(ProtocolError, match="deeper"):
        parse(_update_params(**{K.MSG_ARG_KEY_METRICS: {"resources": deep}}))
    big = SAMPLES[0].to_message()
    big.add_params(K.MSG_ARG_KEY_PROFILE, {"blob": "x" * 100_000})
    with pytest.raises(ProtocolError, match="profile"):
        parse(big)


def test_server_messages_must_come_from_the_server() -> None:
    msg = SAMPLES[4].to_message()
    msg.add_params(K.MSG_ARG_KEY_SENDER, "dev2")
    with pytest.raises(ProtocolError, match="not the server"):
        parse(msg)


def test_a_device_cannot_be_sent_to_as_the_server() -> None:
    with pytest.raises(ProtocolError, match="reserved"):
        JoinAck(receiver="0", accepted=True).to_message()


def test_non_finite_device_metrics_travel_as_null_and_are_named() -> None:
    report = DeviceReport(train_loss=math.nan, train_s=1.0)
    got = parse(Update(sender="d", round=1, num_samples=1, blob=b"x", report=report).to_message())
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
    msg = Message()
    msg.msg_params = params
    with contextlib.suppress(ProtocolError):
        parse(msg)


def test_device_round_fields_keep_the_devices_timings() -> None:
    # set_state_s and encode_s are part of a device's compute (the lab's efficiency): the record keeps them
    rep = DeviceReport(train_s=1.5, set_state_s=0.12, encode_s=0.03, download_s=1.2)
    fields = rep.record_fields()
    assert (fields["set_state_s"], fields["encode_s"], fields["train_s"]) == (0.12, 0.03, 1.5)
    back = DeviceReport.from_record(fields)
    assert (back.set_state_s, back.encode_s, back.train_s, back.download_s) == (0.12, 0.03, 1.5, 1.2)


def test_shared_model_and_a_task_naming_it_round_trip() -> None:
    m = SharedModel(model_id="abc", round=3, blob=b"\x01\x02", manifest_hash="h", encoding="fp32", model_version=2)
    assert m.to_message().get_receiver_id() == K.BROADCAST
    back = parse(m.to_message())
    assert isinstance(back, SharedModel) and back.model_id == "abc" and bytes(back.blob) == b"\x01\x02"
    t = RoundTask(receiver="d1", round=3, blob=b"", manifest_hash="h", encoding="fp32", model_id="abc",
                  model_bytes=2)
    got = parse(t.to_message())
    assert isinstance(got, RoundTask) and got.awaits_model and got.model_id == "abc" and got.model_bytes == 2
    assert bytes(got.with_model(back).blob) == b"\x01\x02"


def test_a_task_with_both_or_neither_tensors_and_model_id_is_refused() -> None:
    t = RoundTask(receiver="d1", round=3, blob=b"\x01", manifest_hash="h", encoding="fp32").to_message()
    t.add_params(K.MSG_ARG_KEY_MODEL_ID, "abc")
    with pytest.raises(ProtocolError, match="model_id"):
        parse(t)
    bare = RoundTask(receiver="d1", round=3, blob=b"\x01", manifest_hash="h", encoding="fp32").to_message()
    del bare.get_params()[K.MSG_ARG_KEY_MODEL_PARAMS]
    with pytest.raises(ProtocolError, match="one of the two"):
        parse(bare)
    m = SharedModel(model_id="abc", round=3, blob=b"\x01", manifest_hash="h", encoding="fp32").to_message()
    m.add_params(K.MSG_ARG_KEY_RECEIVER, "d1")
    with pytest.raises(ProtocolError, match="broadcast"):
        parse(m)
