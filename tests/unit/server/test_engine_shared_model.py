"""comm_args.model_delivery "shared": the round's model goes out once, before the tasks that name it."""

from __future__ import annotations

from pathlib import Path

import torch
from engine_harness import MANIFEST, Harness, state

from fedpeft_edge.protocol import RoundTask, SharedModel
from fedpeft_edge.wire.codec import decode_tensors


def _shared(h: Harness) -> list[SharedModel]:
    return [m for m in h.out if isinstance(m, SharedModel)]


def test_a_round_sends_its_model_once_and_tasks_that_name_it(tmp_path: Path) -> None:
    h = Harness(tmp_path, model_delivery="shared", client_num_per_round=3)
    h.join("a", "b", "c")
    (model,) = _shared(h)
    first_task = next(i for i, m in enumerate(h.out) if isinstance(m, RoundTask))
    assert h.out.index(model) < first_task, "the model goes out before the tasks that name it"
    tasks = h.last_tasks()
    assert sorted(tasks) == ["a", "b", "c"]
    for t in tasks.values():
        assert t.awaits_model and t.model_id == model.model_id and t.model_bytes == memoryview(model.blob).nbytes
        assert t.round == model.round == 1
    got = decode_tensors(bytes(model.blob), MANIFEST, MANIFEST.hash)
    assert all(torch.equal(got[k], v) for k, v in state(0).items())
    # The task filled with the shared model is the per-device task: same tensors, same round.
    filled = tasks["a"].with_model(model)
    assert not filled.awaits_model and bytes(filled.blob) == bytes(model.blob)

    for d in ("a", "b", "c"):
        h.update(d, 1, state(1))
    shared = _shared(h)
    assert len(shared) == 2 and shared[1].round == 2 and shared[1].model_id != model.model_id
    assert all(t.model_id == shared[1].model_id for t in h.tasks()[-3:])


def test_a_re_sent_task_carries_the_tensors(tmp_path: Path) -> None:
    h = Harness(tmp_path, model_delivery="shared", client_num_per_round=3)
    h.join("a", "b", "c")
    (model,) = _shared(h)
    h.join("b")  # b reconnected (or its shared model never arrived): it asks again
    resent = h.tasks()[-1]
    assert resent.receiver == "b" and not resent.awaits_model and resent.model_id is None
    assert bytes(resent.blob) == bytes(model.blob)
    assert len(_shared(h)) == 1, "a re-sent task does not publish the model again"


def test_per_device_delivery_sends_no_shared_model(tmp_path: Path) -> None:
    h = Harness(tmp_path, client_num_per_round=3)
    h.join("a", "b", "c")
    assert not _shared(h)
    assert all(not t.awaits_model and memoryview(t.blob).nbytes for t in h.tasks())


def test_async_a_device_that_joined_after_the_model_gets_the_tensors(tmp_path: Path) -> None:
    h = Harness(tmp_path, model_delivery="shared", round_mode="async", client_num_per_round=3, min_devices=2,
                min_updates=1, async_buffer_size=2)
    h.join("a", "b")
    (model,) = _shared(h)
    assert {t.receiver for t in h.tasks()} == {"a", "b"} and all(t.awaits_model for t in h.tasks())
    h.clock.t += 1.0
    h.join("c")  # joined after version 0 went out: it never received it
    late = h.tasks()[-1]
    assert late.receiver == "c" and not late.awaits_model and bytes(late.blob) == bytes(model.blob)
    h.update("a", 1, state(1), model_version=0)  # a reports and is handed the current model again: by name
    again = h.tasks()[-1]
    assert again.receiver == "a" and again.awaits_model and again.model_id == model.model_id

