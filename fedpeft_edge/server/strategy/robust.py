"""Robust aggregation: coordinate-wise median and trimmed mean (Yin et al., "Byzantine-Robust Distributed
Learning"), so a minority of arbitrary updates cannot move the global model far.

Both ignore `num_samples` on purpose: a device's self-declared weight is exactly what an attacker controls.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from fedpeft_edge.errors import ConfigError, ProtocolError
from fedpeft_edge.server.strategy.base import ClientUpdate, Strategy, effective_local


def _stacked(name: str, g: torch.Tensor, updates: Sequence[ClientUpdate]) -> torch.Tensor:
    """The updates' tensors for `name` as locals (deltas applied, clip/staleness scale too), stacked on dim 0 in
    float64."""
    g64 = g.to(torch.float64)
    rows = [effective_local(name, g64, u) for u in updates]
    return torch.stack(rows) if rows else torch.empty((0, *g.shape), dtype=torch.float64)


def _require(updates: Sequence[ClientUpdate]) -> None:
    if not updates:
        raise ProtocolError("cannot aggregate a round with no accepted updates")


class FedMedian(Strategy):
    """New global = the coordinate-wise median of the updates (the mean of the two middle ones when even)."""

    name = "FedMedian"

    def aggregate(
        self, global_state: Mapping[str, torch.Tensor], updates: Sequence[ClientUpdate]
    ) -> dict[str, torch.Tensor]:
        _require(updates)
        out: dict[str, torch.Tensor] = {}
        for name, g in global_state.items():
            x = _stacked(name, g, updates)
            # torch.median returns the lower middle for even counts; numpy's (and the textbook's) median
            # averages the two middle values, which is what we want.
            out[name] = torch.quantile(x.reshape(len(updates), -1), 0.5, dim=0).reshape(g.shape).to(g.dtype) \
                if x.numel() else g.clone()
        return out


class FedTrimmedAvg(Strategy):
    """New global = per coordinate, the mean of the updates left after cutting the `trim_ratio` largest and
    the `trim_ratio` smallest: floor(trim_ratio * n) from each end (scipy.stats.trim_mean's rule), but at
    least one from each end from n >= 3 when trim_ratio > 0, so that it bites in small rounds (at n = 3 it is
    the median; scipy's rule trims nothing up to n = 4 at the default 0.2)."""

    name = "FedTrimmedAvg"

    def __init__(self, trim_ratio: float) -> None:
        if not 0.0 <= trim_ratio < 0.5:
            raise ConfigError(f"train_args.trim_ratio must be in [0, 0.5), got {trim_ratio!r}")
        self.trim_ratio = trim_ratio

    def aggregate(
        self, global_state: Mapping[str, torch.Tensor], updates: Sequence[ClientUpdate]
    ) -> dict[str, torch.Tensor]:
        _require(updates)
        n = len(updates)
        cut = trim_count(self.trim_ratio, n)
        out: dict[str, torch.Tensor] = {}
        for name, g in global_state.items():
            x, _ = torch.sort(_stacked(name, g, updates), dim=0)
            out[name] = x[cut:n - cut].mean(dim=0).to(g.dtype)
        return out


def trim_count(trim_ratio: float, n: int) -> int:
    """Updates cut from each end of n: floor(trim_ratio * n), at least 1 from n >= 3 if trim_ratio > 0."""
    cut = math.floor(trim_ratio * n)
    return max(cut, 1) if trim_ratio > 0 and n >= 3 else cut
