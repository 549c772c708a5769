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
