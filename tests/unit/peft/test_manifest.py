"""Manifest identity: hash, JSON round trip, stability across independently built models."""

from __future__ import annotations

import pytest
import torch
from tiny_backbones import build

from fedpeft_edge.config import AdapterArgs, PeftArgs
from fedpeft_edge.errors import PeftMethodError
from fedpeft_edge.peft import Manifest, TensorSpec, build_method, check_state


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _manifest(seed: int, width: int = 8) -> Manifest:
    method = build_method(PeftArgs(method="adapter", adapter=AdapterArgs(width=width)))
    return method.manifest(method.apply(build("vit", seed)))


def test_the_same_method_on_two_builds_gives_the_same_hash() -> None:
    assert _manifest(0).hash == _manifest(1).hash  # weights differ, the manifest does not


def test_a_different_width_gives_a_different_hash() -> None:
    assert _manifest(0, 8).hash != _manifest(0, 4).hash


def test_json_round_trip_keeps_order_and_hash() -> None:
    m = _manifest(0)
    back = Manifest.from_json(m.to_json())
    assert back == m and back.hash == m.hash and back.names == m.names
    assert m.nbytes == 4 * m.num_params


def test_broken_json_is_refused() -> None:
    with pytest.raises(PeftMethodError, match="manifest JSON"):
        Manifest.from_json('{"method": "bias"}')


def test_check_state_refuses_a_non_tensor() -> None:
    m = Manifest("head", (TensorSpec("head.weight", (2, 3), "float32"),))
    check_state(m, {"head.weight": torch.zeros(2, 3)})
    with pytest.raises(PeftMethodError, match="torch.Tensor"):
        check_state(m, {"head.weight": [[0.0] * 3] * 2})


def test_an_unapplied_adapter_model_has_no_manifest() -> None:
    method = build_method(PeftArgs(method="adapter"))
    with pytest.raises(PeftMethodError, match="apply"):
        method.manifest(build("vit"))
