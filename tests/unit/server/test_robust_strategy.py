"""FedMedian / FedTrimmedAvg against numpy (and scipy's trim_mean rule), and their resistance to outliers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedpeft_edge.config import TrainArgs
from fedpeft_edge.errors import ConfigError, ProtocolError
from fedpeft_edge.server.strategy import ClientUpdate, FedMedian, FedTrimmedAvg, build_strategy


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a.bias": torch.randn(5, generator=g), "head.weight": torch.randn(3, 4, generator=g)}


def _np_trimmed(x: np.ndarray, ratio: float) -> np.ndarray:
    cut = math.floor(ratio * x.shape[0])
    if ratio > 0 and x.shape[0] >= 3:  # at least one from each end from 3 updates on (robust at small n)
        cut = max(cut, 1)
    s = np.sort(x, axis=0)
    return s[cut:x.shape[0] - cut].mean(axis=0)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7])
def test_median_equals_numpy(n: int) -> None:
    glob = _state(0)
    ups = [ClientUpdate(f"d{i}", 10 * (i + 1), _state(i + 1)) for i in range(n)]
    out = build_strategy(TrainArgs(federated_optimizer="FedMedian")).aggregate(glob, ups)
    for name, g in glob.items():
        want = np.median(np.stack([u.tensors[name].double().numpy() for u in ups]), axis=0)
        np.testing.assert_allclose(out[name].double().numpy(), want, rtol=0, atol=1e-6)
        assert out[name].dtype == g.dtype and out[name].shape == g.shape
    assert list(out) == list(glob)


@pytest.mark.parametrize(("n", "ratio"), [(1, 0.2), (2, 0.2), (3, 0.2), (4, 0.2), (5, 0.2), (6, 0.25),
                                          (10, 0.1), (4, 0.0)])
def test_trimmed_mean_equals_numpy(n: int, ratio: float) -> None:
    glob = _state(0)
    ups = [ClientUpdate(f"d{i}", 1, _state(i + 1)) for i in range(n)]
    out = build_strategy(TrainArgs(federated_optimizer="FedTrimmedAvg", trim_ratio=ratio)).aggregate(glob, ups)
    for name in glob:
        want = _np_trimmed(np.stack([u.tensors[name].double().numpy() for u in ups]), ratio)
        np.testing.assert_allclose(out[name].double().numpy(), want, rtol=0, atol=1e-6)


def test_deltas_are_applied_before_the_median() -> None:
    glob = _state(0)
    locs = [_state(i) for i in (1, 2, 3)]
    a = FedMedian().aggregate(glob, [ClientUpdate(f"d{i}", 1, s) for i, s in enumerate(locs)])
    deltas = [{k: v - glob[k] for k, v in s.items()} for s in locs]
    b = FedMedian().aggregate(glob, [ClientUpdate(f"d{i}", 1, d, True) for i, d in enumerate(deltas)])
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in glob)


def test_one_huge_update_with_huge_weight_cannot_move_robust_aggregates() -> None:
    glob = _state(0)
    honest = [ClientUpdate(f"d{i}", 10, _state(i + 1)) for i in range(4)]
    evil = ClientUpdate("evil", 10**9, {k: torch.full_like(v, 1e6) for k, v in glob.items()})
    for strat in (FedMedian(), FedTrimmedAvg(0.2)):
        out = strat.aggregate(glob, [*honest, evil])
        for k in glob:
            hi = torch.stack([u.tensors[k] for u in honest]).max(dim=0).values
            assert bool((out[k] <= hi + 1e-6).all()), strat.name


def test_robust_strategies_refuse_empty_rounds_and_bad_ratio() -> None:
    with pytest.raises(ProtocolError, match="no accepted updates"):
        FedMedian().aggregate(_state(0), [])
    with pytest.raises(ProtocolError, match="no accepted updates"):
        FedTrimmedAvg(0.1).aggregate(_state(0), [])
    with pytest.raises(ConfigError, match="trim_ratio"):
        FedTrimmedAvg(0.5)
    assert FedMedian().state_dict() == {}
