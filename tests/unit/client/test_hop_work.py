"""Each check and copy once per hop: a PEFT tensor's values are read for finiteness once where they enter a
process (the codec's decode) and once where they leave it (encode), and a training window copies its tensors in
once and out once. Counted by instrumenting the one summing pass (`finiteness._sum`) and the binding's copies."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest
import torch
from test_device_state import tiny_config

from fedpeft_edge import finiteness
from fedpeft_edge.client.device import AgentIdentity, build_device_state
from fedpeft_edge.client.logic import DeviceLogic
from fedpeft_edge.client.runtime import SharedRuntime
from fedpeft_edge.peft.base import StateBinding
from fedpeft_edge.protocol import RoundTask, Update
from fedpeft_edge.server.admission import UpdateAdmission
from fedpeft_edge.wire.codec import encode_tensors


@pytest.fixture(scope="module")
def runtime() -> SharedRuntime:
    return SharedRuntime(tiny_config())


class Counts:
    def __init__(self) -> None:
        self.finite_values = 0  # values summed by a finiteness pass
        self.copies_in = 0  # StateBinding.set: tensors written into a model
        self.copies_out = 0  # StateBinding.get: tensors copied out of a model


@pytest.fixture()
def counts(monkeypatch: pytest.MonkeyPatch) -> Counts:
    c = Counts()
    real_sum, real_get, real_set = finiteness._sum, StateBinding.get, StateBinding.set

    def counting_sum(arr: np.ndarray) -> Any:
        c.finite_values += arr.size
        return real_sum(arr)

    def get(self: StateBinding) -> dict[str, torch.Tensor]:
        c.copies_out += 1
        return real_get(self)

    def set_(self: StateBinding, state: Any, check_finite: bool = True) -> None:
        c.copies_in += 1
        real_set(self, state, check_finite)

    monkeypatch.setattr(finiteness, "_sum", counting_sum)
    monkeypatch.setattr(StateBinding, "get", get)
    monkeypatch.setattr(StateBinding, "set", set_)
    return c


def _task(rt: SharedRuntime, device_id: str) -> RoundTask:
    return RoundTask(receiver=device_id, round=1, manifest_hash=rt.manifest.hash, encoding="fp32",
                     blob=encode_tensors(rt.initial_state, rt.manifest, "fp32"), deadline=time.time() + 60)


def test_a_device_round_checks_each_value_once_in_and_once_out_and_copies_once_each_way(
        runtime: SharedRuntime, counts: Counts) -> None:
    logic = DeviceLogic(runtime, build_device_state(runtime, AgentIdentity("h0", 0)))
    task = _task(runtime, "h0")
    before = counts.finite_values
    (update,) = logic.handle(task)
    assert isinstance(update, Update)
    n = runtime.manifest.num_params
    assert counts.finite_values - before == 2 * n, "decode (in) and encode (out), each value once"
    assert (counts.copies_in, counts.copies_out) == (1, 1), "the window copies its tensors in once, out once"
    sent = logic.state.peft  # what the window copied out is what was encoded: no second copy
    assert bytes(update.blob)[-n * 4:] == b"".join(t.numpy().tobytes() for t in sent.values())


def test_the_server_checks_an_update_once_and_aggregates_the_received_buffer(
        runtime: SharedRuntime, counts: Counts) -> None:
    logic = DeviceLogic(runtime, build_device_state(runtime, AgentIdentity("h1", 1)))
    (update,) = logic.handle(_task(runtime, "h1"))
    admission = UpdateAdmission(runtime.manifest, 1 << 24, send_delta=False, max_norm=1e6, norm_action="clip",
                                measure=True)
    before = counts.finite_values
    admitted = admission.admit(update, runtime.initial_state, declared_samples=0)
    assert counts.finite_values - before == runtime.manifest.num_params, "decode only: one pass over each value"
    flat = admitted.update.flat  # the strategies get the received buffer as one tensor, not a codec type
    assert flat is not None and type(flat) is torch.Tensor
    body = np.frombuffer(update.blob, dtype=np.uint8)
    assert body.ctypes.data <= flat.data_ptr() < body.ctypes.data + body.nbytes, "shared with the payload"
