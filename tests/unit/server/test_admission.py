"""UpdateAdmission: an update decoded as one flat buffer (the codec's uniform path) takes the whole-buffer route
for its delta, norm and clip; its result must equal the per-tensor route's, and the running mean of it must be
bit-identical to the per-tensor sum (the same float64 arithmetic, element for element)."""

from __future__ import annotations

import math

import pytest
import torch

from fedpeft_edge.peft.base import Manifest, TensorSpec
from fedpeft_edge.protocol import Update
from fedpeft_edge.server.admission import NormBoundExceeded, UpdateAdmission
from fedpeft_edge.server.strategy import ClientUpdate, FedAvg
from fedpeft_edge.wire.codec import FlatTensors, decode_tensors, encode_tensors

MANIFEST = Manifest("bias", (TensorSpec("a.bias", (6,), "float32"), TensorSpec("b.weight", (2, 3), "float32"),
                             TensorSpec("c.bias", (4,), "float32")))


def _state(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {s.name: scale * torch.randn(s.shape, generator=g) for s in MANIFEST.tensors}


def _update(local: dict[str, torch.Tensor], sender: str = "d1") -> Update:
    return Update(sender=sender, round=1, num_samples=10, blob=bytes(encode_tensors(local, MANIFEST)))


def _admission(max_norm: float | None = None, action: str = "clip") -> UpdateAdmission:
    return UpdateAdmission(MANIFEST, 1 << 20, send_delta=False, max_norm=max_norm, norm_action=action, measure=True)


def _per_tensor(local: dict[str, torch.Tensor], base: dict[str, torch.Tensor], max_norm: float | None
                ) -> tuple[dict[str, torch.Tensor], float]:
    deltas = {k: local[k].double() - base[k].double() for k in base}
    norm = math.sqrt(sum(float((d * d).sum()) for d in deltas.values()))
    if max_norm is not None and norm > max_norm:
        deltas = {k: d * (max_norm / norm) for k, d in deltas.items()}
    return deltas, norm


def test_a_uniform_update_decodes_flat() -> None:  # the premise of the flat route
    assert isinstance(decode_tensors(_update(_state(1)).blob, MANIFEST, MANIFEST.hash, 1 << 20, copy=False),
                      FlatTensors)


@pytest.mark.parametrize("max_norm", [None, 1.0])
def test_a_flat_delta_equals_the_per_tensor_delta(max_norm: float | None) -> None:
    base, local = _state(0), _state(1)
    adm = _admission(max_norm).admit(_update(local), base, declared_samples=10, as_delta=True)
    want, norm = _per_tensor(local, base, max_norm)
    assert adm.norm == pytest.approx(norm, rel=1e-12)
    assert adm.norm_action == ("clipped" if max_norm is not None else None)
    assert adm.update.is_delta and adm.update.flat is not None and list(adm.update.tensors) == list(base)
    for k in base:
        assert adm.update.tensors[k].shape == base[k].shape
        torch.testing.assert_close(adm.update.tensors[k], want[k], rtol=1e-12, atol=1e-15)


def test_a_clipped_local_is_the_base_plus_the_clipped_delta_in_the_base_dtype() -> None:
    base, local = _state(0), _state(1, scale=5.0)
    adm = _admission(1.0).admit(_update(local), base, declared_samples=10)
    want, _ = _per_tensor(local, base, 1.0)
    assert adm.norm_action == "clipped" and not adm.update.is_delta
    for k in base:
        assert adm.update.tensors[k].dtype == torch.float32
        torch.testing.assert_close(adm.update.tensors[k], (base[k].double() + want[k]).float(), rtol=0, atol=1e-6)


def test_an_unclipped_update_is_passed_on_as_received_and_the_payload_is_never_written() -> None:
    base, local = _state(0), _state(1)
    msg = _update(local)
    before = bytes(msg.blob)
    adm = _admission(1e9).admit(msg, base, declared_samples=10)
    assert adm.norm_action is None and not adm.update.is_delta
    assert all(torch.equal(adm.update.tensors[k], local[k]) for k in base)
    _admission(1e-3).admit(msg, base, declared_samples=10, as_delta=True)  # clipped in place: its own copy
    assert bytes(msg.blob) == before


def test_drop_over_the_bound_raises() -> None:
    with pytest.raises(NormBoundExceeded):
        _admission(1e-3, action="drop").admit(_update(_state(1)), _state(0), declared_samples=10)


def test_the_base_cache_follows_a_new_global_model() -> None:
    adm = _admission()
    base0, base1, local = _state(0), _state(2), _state(1)
    a = adm.admit(_update(local), base0, declared_samples=10, as_delta=True)
    b = adm.admit(_update(local), base1, declared_samples=10, as_delta=True)
    c = adm.admit(_update(local), base0, declared_samples=10, as_delta=True)
    for k in base0:
        torch.testing.assert_close(b.update.tensors[k], local[k].double() - base1[k].double())
        assert torch.equal(a.update.tensors[k], c.update.tensors[k])


@pytest.mark.parametrize("scale", [1.0, 1 / math.sqrt(2.0)])
def test_the_running_mean_of_flat_deltas_is_bit_identical_to_the_per_tensor_sum(scale: float) -> None:
    base = _state(0)
    adm = _admission()
    flat_agg, dict_agg = FedAvg().begin(base), FedAvg().begin(base)
    for i in range(1, 4):
        up = adm.admit(_update(_state(i), f"d{i}"), base, declared_samples=10, as_delta=True).update
        up = ClientUpdate(up.device_id, up.num_samples + i, up.tensors, is_delta=True, scale=scale, flat=up.flat)
        flat_agg.add(up)
        dict_agg.add(ClientUpdate(up.device_id, up.num_samples, {k: v.clone() for k, v in up.tensors.items()},
                                  is_delta=True, scale=scale))
    a, b = flat_agg.result(), dict_agg.result()
    assert all(torch.equal(a[k], b[k]) for k in base)
