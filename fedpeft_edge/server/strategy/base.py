"""The aggregation interface: global tensors + accepted client updates -> new global tensors."""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Mapping, Sequence

import torch

from fedpeft_edge.errors import ProtocolError


@dataclasses.dataclass(frozen=True)
class ClientUpdate:
    """One accepted update: the device's tensors (or deltas from the global ones) and its sample count."""

    device_id: str
    num_samples: int
    tensors: Mapping[str, torch.Tensor]
    is_delta: bool = False


class Strategy(abc.ABC):
    """Turns a round's accepted updates into the next global tensors; never mutates its inputs."""

    name: str = "strategy"

    @abc.abstractmethod
    def aggregate(
        self, global_state: Mapping[str, torch.Tensor], updates: Sequence[ClientUpdate]
    ) -> dict[str, torch.Tensor]:
        """The next global tensors, in global_state's order and dtypes."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Server-optimiser tensors to checkpoint (empty for stateless strategies)."""
        return {}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore what state_dict() returned."""
        if state:
            raise ProtocolError(f"{self.name} keeps no state but a checkpoint holds {len(state)} strategy tensors")


def weighted_mean(
    global_state: Mapping[str, torch.Tensor], updates: Sequence[ClientUpdate]
) -> dict[str, torch.Tensor]:
    """Sample-weighted mean of the clients' tensors (deltas applied to the global), accumulated in float64."""
    if not updates:
        raise ProtocolError("cannot aggregate a round with no accepted updates")
    total = sum(u.num_samples for u in updates)
    if total <= 0:
        raise ProtocolError(f"accepted updates report {total} samples in all; every update needs num_samples > 0")
    out: dict[str, torch.Tensor] = {}
    for name, g in global_state.items():
        acc = torch.zeros(g.shape, dtype=torch.float64)
        for u in updates:
            t = u.tensors[name].to(torch.float64)
            if u.is_delta:
                t = t + g.to(torch.float64)
            acc.add_(t, alpha=u.num_samples / total)
        out[name] = acc
    return out
