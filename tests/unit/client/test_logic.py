"""DeviceLogic's liveness rules: one training per round, rate-limited resends, stale syncs ignored."""

from __future__ import annotations

import time
from typing import Any

import pytest
from test_device_state import tiny_config

from fedpeft_edge.client.device import AgentIdentity, build_device_state
from fedpeft_edge.client.logic import DeviceLogic, SyncAction
from fedpeft_edge.client.runtime import SharedRuntime
from fedpeft_edge.protocol import (
    ClientStatus,
    ConnectionReady,
    DeviceErrorReport,
    Join,
    JoinAck,
    Presence,
    RoundTask,
    SharedModel,
    Update,
)
from fedpeft_edge.wire.codec import encode_tensors


@pytest.fixture(scope="module")
def runtime() -> SharedRuntime:
    return SharedRuntime(tiny_config())


def _sync(rt: SharedRuntime, device_id: str, round_idx: int, deadline: float | None = None,
          manifest_hash: str | None = None) -> RoundTask:
    return RoundTask(receiver=device_id, round=round_idx, manifest_hash=manifest_hash or rt.manifest.hash,
                     encoding="fp32", blob=encode_tensors(rt.initial_state, rt.manifest, "fp32"),
                     deadline=deadline if deadline is not None else time.time() + 60)


class CountingTrainer:
    """Counts the runtime trainer's train() calls (the real loop still runs)."""

    def __init__(self, rt: SharedRuntime) -> None:
        self.calls = 0
        self._train = rt.trainer.train

        def train(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return self._train(*args, **kwargs)

        rt.trainer.train = train  # type: ignore[method-assign]
        self.rt = rt

    def restore(self) -> None:
        self.rt.trainer.train = self._train  # type: ignore[method-assign]


def test_a_round_trains_once_and_resends_at_most_n_times(runtime: SharedRuntime) -> None:
    logic = DeviceLogic(runtime, build_device_state(runtime, AgentIdentity("r0", 0)))
    counter = CountingTrainer(runtime)
    try:
        (first,) = logic.handle(_sync(runtime, "r0", 1))
        assert isinstance(first, Update) and first.round == 1
        ids = {first.msg_id}
        resent = [logic.handle(_sync(runtime, "r0", 1)) for _ in range(5)]
        assert [len(r) for r in resent] == [1, 1, 1, 0, 0]  # train_args.resend_rate_per_round = 3
        for (msg,) in resent[:3]:
            assert isinstance(msg, Update) and msg.blob is first.blob  # the stored update, not retrained
            ids.add(msg.msg_id)
        assert len(ids) == 4, "every resend is a new message (the transport drops a repeated id)"
        assert counter.calls == 1
        assert logic.handle(_sync(runtime, "r0", 2))  # the next round trains, and its resend budget is fresh
        assert logic.handle(_sync(runtime, "r0", 1)) == []  # older than the last trained round
        assert len(logic.handle(_sync(runtime, "r0", 2))) == 1
        assert counter.calls == 2
    finally:
        counter.restore()


def test_sync_during_training_after_deadline_or_malformed_is_ignored(runtime: SharedRuntime) -> None:
    logic = DeviceLogic(runtime, build_device_state(runtime, AgentIdentity("r1", 1)))
    action, _ = logic.classify_sync(_sync(runtime, "r1", 3))
    assert action is SyncAction.TRAIN
    assert logic.classify_sync(_sync(runtime, "r1", 3))[0] is SyncAction.IGNORE  # training it right now
    assert logic.classify_sync(_sync(runtime, "r1", 4))[0] is SyncAction.IGNORE  # one round at a time
    logic.train(_sync(runtime, "r1", 3))
    assert logic.classify_sync(_sync(runtime, "r1", 5, deadline=time.time() - 1))[0] is SyncAction.IGNORE
    assert logic.classify_sync(_sync(runtime, "r1", 2))[0] is SyncAction.IGNORE  # older than the last


def test_a_failed_round_reports_an_error_and_is_not_retrained(runtime: SharedRuntime) -> None:
    logic = DeviceLogic(runtime, build_device_state(runtime, AgentIdentity("r2", 2)))
    (err,) = logic.handle(_sync(runtime, "r2", 1, manifest_hash="0" * 64))
    assert isinstance(err, DeviceErrorReport) and "manifest" in err.error
    (again,) = logic.handle(_sync(runtime, "r2", 1))
    assert again is err  # the stored reply, not a second training
    logic.state.exhausted = True
    (status,) = logic.handle(_sync(runtime, "r2", 2))
    assert isinstance(status, ClientStatus) and status.exhausted


def test_join_on_server_presence_once_per_session(runtime: SharedRuntime) -> None:
    logic = DeviceLogic(runtime, build_device_state(runtime, AgentIdentity("r3", 0)))
    ready = ConnectionReady("r3")
    assert logic.handle(ready) == []  # waits for the server's presence

    def presence(since: float) -> Presence:
        return Presence(node="0", online=True, since=since, receiver="r3")

    (join,) = logic.handle(presence(1.0))
    assert isinstance(join, Join) and join.num_samples > 0 and join.sender == "r3"
    assert logic.handle(presence(1.0)) == []
    assert logic.handle(Presence(node="dev7", online=True, since=1.0, receiver="r3")) == []  # not the server
    assert len(logic.handle(presence(2.0))) == 1  # a restarted server: join again
    assert len(logic.handle(ready)) == 1  # a reconnect while the server is up
    logic.handle(JoinAck(receiver="r3", accepted=False, reason="wrong backbone"))
    assert logic.finished and logic.exit_code == 3 and logic.refusal == "wrong backbone"


def _shared(rt: SharedRuntime, round_idx: int, model_id: str = "m1", **kw: Any) -> tuple[RoundTask, SharedModel]:
    """A task naming a shared model, and that model."""
    blob = encode_tensors(rt.initial_state, rt.manifest, "fp32")
    model = SharedModel(model_id=model_id, round=round_idx, blob=blob, manifest_hash=rt.manifest.hash,
                        encoding="fp32")
    task = RoundTask(receiver=kw.pop("receiver", "s0"), round=round_idx, manifest_hash=rt.manifest.hash,
                     encoding="fp32", blob=b"", model_id=model_id, model_bytes=kw.pop("model_bytes", len(blob)),
                     deadline=time.time() + 60, **kw)
    return task, model


def test_a_task_naming_a_shared_model_trains_once_the_model_is_there(runtime: SharedRuntime) -> None:
    logic = DeviceLogic(runtime, build_device_state(runtime, AgentIdentity("s0", 0)))
    task, model = _shared(runtime, 1)
    assert logic.handle(model) == [], "a model with no task waiting for it is only kept"
    (up,) = logic.handle(task)
    assert isinstance(up, Update) and up.round == 1
    task2, model2 = _shared(runtime, 2, "m2")
    assert logic.handle(task2) == [], "the task waits for its model"
    assert logic.handle(_shared(runtime, 2, "other")[1]) == [], "another model does not fill it"
    (up2,) = logic.handle(model2)
    assert isinstance(up2, Update) and up2.round == 2


def test_a_shared_model_that_never_comes_makes_the_device_ask_again(runtime: SharedRuntime) -> None:
    logic = DeviceLogic(runtime, build_device_state(runtime, AgentIdentity("s0", 0)))
    task, model = _shared(runtime, 1)
    assert logic.classify_sync(task)[0] is SyncAction.TRAIN and logic.take_model(task) is None
    assert logic.model_missing(1, 5) == [], "a timer of another task does nothing"
    (join,) = logic.model_missing(1, 0)
    assert isinstance(join, Join) and join.sender == "s0"
    full = RoundTask(receiver="s0", round=1, manifest_hash=runtime.manifest.hash, encoding="fp32", blob=model.blob,
                     deadline=time.time() + 60)
    assert logic.classify_sync(full)[0] is SyncAction.TRAIN, "the re-sent task (with its tensors) trains"


def test_a_full_task_re_sent_while_the_model_is_due_trains(runtime: SharedRuntime) -> None:
    logic = DeviceLogic(runtime, build_device_state(runtime, AgentIdentity("s0", 0)))
    task, model = _shared(runtime, 1)
    assert logic.handle(task) == []
    full = RoundTask(receiver="s0", round=1, manifest_hash=runtime.manifest.hash, encoding="fp32", blob=model.blob,
                     deadline=time.time() + 60)
    (up,) = logic.handle(full)
    assert isinstance(up, Update)
    assert logic.handle(model) == [], "the model arriving late trains nothing more"


def test_a_shared_model_of_another_size_is_refused(runtime: SharedRuntime) -> None:
    logic = DeviceLogic(runtime, build_device_state(runtime, AgentIdentity("s0", 0)))
    task, model = _shared(runtime, 1, model_bytes=12)
    assert logic.handle(task) == []
    assert logic.handle(model) == [], "the task names 12 bytes: this model is not its model"


def test_the_run_class_list_in_the_join_ack_relabels_the_device_by_name(runtime: SharedRuntime) -> None:
    logic = DeviceLogic(runtime, build_device_state(runtime, AgentIdentity("c0", 0)))
    own = logic.state.data.class_names
    assert logic.join().class_names == own  # digits: "0".."9"
    before = logic.state.data.train_labels.copy()
    run = tuple(reversed(own))  # the run numbers the same classes the other way round
    logic.handle(JoinAck(receiver="c0", accepted=True, class_names=run))
    assert not logic.finished and logic.state.data.class_names == run
    assert (logic.state.data.train_labels == 9 - before).all()
    logic.handle(JoinAck(receiver="c0", accepted=True, class_names=("cat", "dog")))
    assert logic.finished and "not among the run's classes" in str(logic.refusal)
