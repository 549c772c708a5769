"""FedAdam and FedYogi server optimisers (Reddi et al., "Adaptive Federated Optimization")."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fedpeft_edge.errors import ProtocolError
from fedpeft_edge.server.strategy.base import MeanStrategy


class FedAdam(MeanStrategy):
    """Pseudo-gradient = weighted mean - global; Adam-style moments on the server, kept in float64."""

    name = "FedAdam"

    def __init__(self, lr: float, beta1: float, beta2: float, tau: float) -> None:
        self.lr, self.beta1, self.beta2, self.tau = lr, beta1, beta2, tau
        self._m: dict[str, torch.Tensor] = {}
        self._v: dict[str, torch.Tensor] = {}

    def _second_moment(self, v: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
        return self.beta2 * v + (1 - self.beta2) * d2

    def apply_mean(
        self, global_state: Mapping[str, torch.Tensor], mean: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """One server-optimiser step on the pseudo-gradient (mean - global)."""
        out: dict[str, torch.Tensor] = {}
        for name, g in global_state.items():
            g64 = g.to(torch.float64)
            delta = mean[name] - g64
            m = self._m.get(name, torch.zeros_like(g64))
            v = self._v.get(name, torch.full_like(g64, self.tau**2))
            m = self.beta1 * m + (1 - self.beta1) * delta
            v = self._second_moment(v, delta * delta)
            self._m[name], self._v[name] = m, v
            out[name] = (g64 + self.lr * m / (v.sqrt() + self.tau)).to(g.dtype)
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"m/{k}": v for k, v in self._m.items()}
        state.update({f"v/{k}": v for k, v in self._v.items()})
        return state

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        for key, value in state.items():
            kind, _, name = key.partition("/")
            if kind not in ("m", "v") or not name:
                raise ProtocolError(f"{self.name}: unexpected strategy tensor {key!r} in checkpoint")
            (self._m if kind == "m" else self._v)[name] = value.to(torch.float64)


class FedYogi(FedAdam):
    """FedAdam with Yogi's additive second-moment update, which grows v more cautiously."""

    name = "FedYogi"

    def _second_moment(self, v: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
        return v - (1 - self.beta2) * d2 * torch.sign(v - d2)
