"""DeviceLogic's liveness rules: one training per round, rate-limited resends, stale syncs ignored."""

from __future__ import annotations

import time
from typing import Any

import pytest
from test_device_state import tiny_config

from fedpeft_edge.client.device import AgentIdentity, build_device_state
from fedpeft_edge.client.logic import DeviceLogic, SyncAction
from fedpeft_edge.client.runtime import SharedRuntime
from fedpeft_edge.transport import messages as M
from fedpeft_edge.transport.fedml import Message
from fedpeft_edge.wire.codec import encode_tensors


@pytest.fixture(scope="module")
def runtime() -> SharedRuntime:
    return SharedRuntime(tiny_config())


def _sync(rt: SharedRuntime, device_id: str, round_idx: int, deadline: float | None = None) -> Any:
    msg = Message(M.MSG_TYPE_S2C_SYNC_MODEL_TO_CLIENT, M.SERVER_ID, device_id)
    msg.add_params(M.MSG_ARG_KEY_ROUND, round_idx)
    msg.add_params(M.MSG_ARG_KEY_MANIFEST_HASH, rt.manifest.hash)
    msg.add_params(M.MSG_ARG_KEY_DEADLINE, deadline if deadline is not None else time.time() + 60)
    msg.add_params(M.MSG_ARG_KEY_CONFIG, {"evaluate": False})
    msg.add_params(M.MSG_ARG_KEY_MODEL_PARAMS, encode_tensors(rt.initial_state, rt.manifest, "fp32"))
    return msg


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
        first = logic.handle(_sync(runtime, "r0", 1))
        assert [m.get_type() for m in first] == [M.MSG_TYPE_C2S_SEND_MODEL_TO_SERVER]
        ids = {first[0].get(M.MSG_ARG_KEY_MSG_ID)}
        resent = [logic.handle(_sync(runtime, "r0", 1)) for _ in range(5)]
        assert [len(r) for r in resent] == [1, 1, 1, 0, 0]  # device_args.max_resends_per_round = 3
        for (msg,) in resent[:3]:
            assert msg.get(M.MSG_ARG_KEY_MODEL_PARAMS) is first[0].get(M.MSG_ARG_KEY_MODEL_PARAMS)
            ids.add(msg.get(M.MSG_ARG_KEY_MSG_ID))
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
    bad = _sync(runtime, "r1", 6)
    bad.add_params(M.MSG_ARG_KEY_ROUND, "6")
    assert logic.classify_sync(bad)[0] is SyncAction.IGNORE


def test_a_failed_round_reports_an_error_and_is_not_retrained(runtime: SharedRuntime) -> None:
    logic = DeviceLogic(runtime, build_device_state(runtime, AgentIdentity("r2", 2)))
    wrong = _sync(runtime, "r2", 1)
    wrong.add_params(M.MSG_ARG_KEY_MANIFEST_HASH, "0" * 64)
    (err,) = logic.handle(wrong)
    assert err.get_type() == M.MSG_TYPE_C2S_ERROR and "manifest" in err.get(M.MSG_ARG_KEY_ERROR)
    (again,) = logic.handle(_sync(runtime, "r2", 1))
    assert again.get_type() == M.MSG_TYPE_C2S_ERROR  # the stored reply, not a second training


def test_join_on_server_presence_once_per_session(runtime: SharedRuntime) -> None:
    logic = DeviceLogic(runtime, build_device_state(runtime, AgentIdentity("r3", 0)))
    ready = Message(M.MSG_TYPE_CONNECTION_IS_READY, "r3", "r3")
    assert logic.handle(ready) == []  # waits for the server's presence

    def presence(since: float) -> Any:
        msg = Message(M.MSG_TYPE_PRESENCE, M.SERVER_ID, "r3")
        msg.add_params(M.MSG_ARG_KEY_PRESENCE, M.PRESENCE_ONLINE)
        msg.add_params(M.MSG_ARG_KEY_PRESENCE_SINCE, since)
        return msg

    (join,) = logic.handle(presence(1.0))
    assert join.get_type() == M.MSG_TYPE_C2S_JOIN and join.get(M.MSG_ARG_KEY_NUM_SAMPLES) > 0
    assert logic.handle(presence(1.0)) == []
    assert len(logic.handle(presence(2.0))) == 1  # a restarted server: join again
    assert len(logic.handle(ready)) == 1  # a reconnect while the server is up
    refuse = Message(M.MSG_TYPE_S2C_JOIN_ACK, M.SERVER_ID, "r3")
    refuse.add_params(M.MSG_ARG_KEY_ACCEPTED, False)
    refuse.add_params(M.MSG_ARG_KEY_REASON, "wrong backbone")
    logic.handle(refuse)
    assert logic.finished and logic.exit_code == 3 and logic.refusal == "wrong backbone"
