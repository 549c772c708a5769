"""FedAvg / FedAdam / FedYogi against independent recomputation."""

from __future__ import annotations

import pytest
import torch

from fedpeft_edge.config import TrainArgs
from fedpeft_edge.errors import ProtocolError
from fedpeft_edge.server.strategy import ClientUpdate, FedAvg, FedYogi, build_strategy


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a.bias": torch.randn(5, generator=g), "head.weight": torch.randn(3, 4, generator=g)}


def test_fedavg_is_sample_weighted_mean_in_float64() -> None:
    glob = _state(0)
    ups = [ClientUpdate("d1", 10, _state(1)), ClientUpdate("d2", 30, _state(2))]
    out = FedAvg().aggregate(glob, ups)
    for name in glob:
        want = (_state(1)[name].double() * 10 + _state(2)[name].double() * 30) / 40
        assert torch.allclose(out[name].double(), want, atol=1e-7)
        assert out[name].dtype == glob[name].dtype
    assert list(out) == list(glob)


def test_fedavg_of_deltas_equals_fedavg_of_locals() -> None:
    glob = _state(0)
    locs = [_state(1), _state(2)]
    deltas = [{k: v - glob[k] for k, v in s.items()} for s in locs]
    a = FedAvg().aggregate(glob, [ClientUpdate("d1", 3, locs[0]), ClientUpdate("d2", 5, locs[1])])
    b = FedAvg().aggregate(glob, [ClientUpdate("d1", 3, deltas[0], True), ClientUpdate("d2", 5, deltas[1], True)])
    for k in glob:
        assert torch.allclose(a[k], b[k], atol=1e-6)


def test_aggregate_does_not_mutate_inputs() -> None:
    glob, loc = _state(0), _state(1)
    before = {k: v.clone() for k, v in loc.items()}
    FedAvg().aggregate(glob, [ClientUpdate("d1", 1, loc)])
    assert all(torch.equal(before[k], loc[k]) for k in loc)


def test_empty_round_is_refused() -> None:
    with pytest.raises(ProtocolError, match="no accepted updates"):
        FedAvg().aggregate(_state(0), [])


def test_fedadam_moves_towards_mean_and_round_trips_state() -> None:
    glob = _state(0)
    strat = build_strategy(TrainArgs(federated_optimizer="FedAdam", server_learning_rate=0.1))
    out = strat.aggregate(glob, [ClientUpdate("d1", 1, _state(1))])
    for k in glob:
        delta = _state(1)[k] - glob[k]
        step = out[k] - glob[k]
        assert (torch.sign(step) == torch.sign(delta)).float().mean() > 0.9
    clone = build_strategy(TrainArgs(federated_optimizer="FedAdam", server_learning_rate=0.1))
    clone.load_state_dict(strat.state_dict())
    a = strat.aggregate(out, [ClientUpdate("d1", 1, _state(2))])
    b = clone.aggregate(out, [ClientUpdate("d1", 1, _state(2))])
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert isinstance(build_strategy(TrainArgs(federated_optimizer="FedYogi")), FedYogi)


def test_a_decoded_update_is_summed_as_one_view_with_the_same_result_as_per_tensor() -> None:
    """The codec decodes a uniform blob into views of one buffer: RunningMean adds it in one call, bit-equal
    to adding tensor by tensor; tensors that do not lie one after another take the per-tensor path."""
    from fedpeft_edge.peft.base import Manifest, TensorSpec
    from fedpeft_edge.server.strategy.base import RunningMean, _flat_of, consecutive_view
    from fedpeft_edge.wire.codec import decode_tensors, encode_tensors

    glob = _state(0)
    manifest = Manifest("bias", tuple(TensorSpec.of(k, v) for k, v in glob.items()))
    decoded = decode_tensors(encode_tensors(_state(1), manifest), manifest)
    assert consecutive_view(decoded, glob, 17) is not None
    assert consecutive_view(_state(1), glob, 17) is None  # two separate allocations
    swapped = dict(reversed(list(decoded.items())))
    assert consecutive_view(swapped, list(reversed(list(glob))), 17) is None  # not in the accumulator's order
    as_decoded = ClientUpdate("d1", 3, decoded, flat=decoded.flat)  # as admission passes it on
    assert _flat_of(as_decoded, tuple(glob), 17) is decoded.flat  # as decoded: no views
    assert _flat_of(as_decoded, tuple(reversed(list(glob))), 17) is None
    assert _flat_of(as_decoded, tuple(glob), 16) is None

    flat, apart = RunningMean(FedAvg(), glob), RunningMean(FedAvg(), glob)
    flat.add(as_decoded)
    apart.add(ClientUpdate("d1", 3, {k: v.clone() for k, v in decoded.items()}))
    flat.add(ClientUpdate("d2", 5, _state(2)))
    apart.add(ClientUpdate("d2", 5, _state(2)))
    a, b = flat.result(), apart.result()
    assert all(torch.equal(a[k], b[k]) for k in glob)
    want = {k: ((_state(1)[k].double() * 3 + _state(2)[k].double() * 5) / 8).float() for k in glob}
    assert all(torch.equal(a[k], want[k]) for k in glob)
