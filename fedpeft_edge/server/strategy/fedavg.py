"""FedAvg: the sample-weighted mean of the accepted updates (McMahan et al.), in float64."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fedpeft_edge.server.strategy.base import MeanStrategy


class FedAvg(MeanStrategy):
    """New global = sum_k n_k/n * local_k, accumulated in float64 and cast back to each tensor's dtype."""

    name = "FedAvg"

    def apply_mean(
        self, global_state: Mapping[str, torch.Tensor], mean: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        return {name: mean[name].to(g.dtype) for name, g in global_state.items()}
