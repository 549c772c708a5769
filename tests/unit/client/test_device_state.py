"""Devices sharing one runtime: each one's PEFT tensors, optimizer state and RNG stay its own."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from fedpeft_edge.client.device import AgentIdentity, DeviceOwnState, build_device_state
from fedpeft_edge.client.runtime import SharedRuntime
from fedpeft_edge.config import RunConfig, config_from_dict
from fedpeft_edge.errors import FedPeftError

TINY_VIT = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}


def tiny_config(**train: Any) -> RunConfig:
    return config_from_dict({
        "common_args": {"run_id": "unit", "random_seed": 3},
        "data_args": {"dataset": "digits", "partition_method": "dirichlet", "partition_alpha": 0.5,
                      "image_size": 32, "batch_size": 16, "max_train_samples": 240, "max_test_samples": 50,
                      "min_samples_per_client": 5},
        "model_args": {"model": "vit_tiny_patch16_224", "num_classes": 10, "weights": "none",
                       "model_kwargs": TINY_VIT},
        "peft_args": {"method": "bias"},
        "train_args": {"client_num_in_total": 3, "client_num_per_round": 3, "learning_rate": 0.05,
                       "momentum": 0.9, "max_steps": 3, **train},
        "device_args": {"num_threads": 1, "measure_latency": False},
    })


@pytest.fixture(scope="module")
def runtime() -> SharedRuntime:
    return SharedRuntime(tiny_config())


def _train(rt: SharedRuntime, state: DeviceOwnState) -> dict[str, torch.Tensor]:
    with rt.activate(state) as slot:
        slot.trainer.train(max_steps=3)
    return {k: v.clone() for k, v in state.peft.items()}


def _momentum(state: DeviceOwnState) -> list[torch.Tensor]:
    return [s["momentum_buffer"].clone() for s in state.optimizer["state"].values()]


def test_interleaved_devices_train_exactly_as_alone(runtime: SharedRuntime) -> None:
    """a, b, a on one runtime gives a the same tensors as a, a on a runtime of its own: nothing leaks."""
    a, b = (build_device_state(runtime, AgentIdentity(f"d{i}", i)) for i in (0, 1))
    a1 = _train(runtime, a)
    b_before = {k: v.clone() for k, v in b.peft.items()}
    assert not _momentum(b), "b has not trained: no optimizer state of its own yet"
    b1 = _train(runtime, b)
    a2 = _train(runtime, a)
    assert all(not torch.equal(a1[k], b1[k]) for k in ("head.bias",)), "different shards, different tensors"
    assert all(not torch.equal(b1[k], b_before[k]) for k in ("head.bias",))

    alone_rt = SharedRuntime(tiny_config())
    alone = build_device_state(alone_rt, AgentIdentity("d0", 0))
    assert all(torch.equal(a1[k], v) for k, v in _train(alone_rt, alone).items())
    assert all(torch.equal(a2[k], v) for k, v in _train(alone_rt, alone).items())
    assert all(torch.equal(x, y) for x, y in zip(_momentum(a), _momentum(alone), strict=True))
    assert torch.equal(a.rng, alone.rng)


def test_optimizer_state_cleared_each_round_is_not_swapped_and_costs_a_device_nothing(
        runtime: SharedRuntime) -> None:
    """The trainer clears momentum at each train() (a fresh optimizer per round, as FedAvg has it), so a
    device has no optimizer state of its own to keep between windows."""
    a = build_device_state(runtime, AgentIdentity("o0", 0))
    blank = a.optimizer
    _train(runtime, a)
    assert a.optimizer is blank and not _momentum(a)
    assert a.nbytes()["optimizer"] == 0
    assert runtime.trainer.base_optimizer.state, "the momentum lives in the shared optimizer until the next round"


def test_swap_out_keeps_each_devices_optimizer_state() -> None:
    runtime = SharedRuntime(tiny_config())
    runtime.trainer.keep_optimizer_state = True  # momentum carried across rounds: each device keeps its own
    a, b = (build_device_state(runtime, AgentIdentity(f"s{i}", i)) for i in (0, 2))
    _train(runtime, a)
    mom_a = _momentum(a)
    _train(runtime, b)
    assert all(torch.equal(x, y) for x, y in zip(mom_a, _momentum(a), strict=True)), "b's step changed a"
    assert any(not torch.equal(x, y) for x, y in zip(mom_a, _momentum(b), strict=True))
    optimizer = runtime.trainer.base_optimizer
    _train(runtime, a)
    assert runtime.trainer.base_optimizer is optimizer, "the optimizer is built once, never per device"
    assert runtime.trainer.train_loader == (), "no device's loader stays bound after its window"
    sizes = a.nbytes()
    assert sizes["peft"] == runtime.manifest.num_params * 4 and sizes["optimizer"] == sizes["peft"]
    assert sizes["data"] > 0 and sizes["total"] == sizes["peft"] + sizes["optimizer"] + sizes["data"]
    assert runtime.shared_bytes() > sizes["peft"]


def test_tensors_load_only_into_the_active_device(runtime: SharedRuntime) -> None:
    a = build_device_state(runtime, AgentIdentity("x0", 0))
    with pytest.raises(FedPeftError, match="not active"):
        runtime.load_peft(a, a.peft)
    zero = {k: torch.zeros_like(v) for k, v in a.peft.items()}
    with runtime.activate(a):
        runtime.load_peft(a, zero)
    assert all(torch.equal(v, zero[k]) for k, v in a.peft.items())


def test_replica_slots_share_the_frozen_backbone_and_train_apart() -> None:
    rt = SharedRuntime(tiny_config(), slots=2)
    a, b = (build_device_state(rt, AgentIdentity(f"p{i}", i)) for i in (0, 1))
    with rt.activate(a) as sa, rt.activate(b) as sb:  # two devices at once, one slot each
        assert sa.model is not sb.model
        shared = dict(sa.model.named_parameters())
        for name, p in sb.model.named_parameters():
            same = p.data_ptr() == shared[name].data_ptr()
            assert same != p.requires_grad, name  # frozen: one storage; trainable: each slot its own
        sa.trainer.train(max_steps=2)
        assert all(torch.equal(v, b.peft[k]) for k, v in rt.current_peft(b).items()), "a's step moved b"
    assert any(not torch.equal(v, b.peft[k]) for k, v in a.peft.items())
