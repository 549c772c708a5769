"""FedAvg: the sample-weighted mean of the accepted updates (McMahan et al.), in float64."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from fedpeft_edge.server.strategy.base import ClientUpdate, Strategy, weighted_mean


class FedAvg(Strategy):
    """New global = sum_k n_k/n * local_k, accumulated in float64 and cast back to each tensor's dtype."""

    name = "FedAvg"
    streaming = True

    def aggregate(
        self, global_state: Mapping[str, torch.Tensor], updates: Sequence[ClientUpdate]
    ) -> dict[str, torch.Tensor]:
        return self.apply_mean(global_state, weighted_mean(global_state, updates))

    def apply_mean(
        self, global_state: Mapping[str, torch.Tensor], mean: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        return {name: mean[name].to(g.dtype) for name, g in global_state.items()}
