"""Per-device shapes of a run's shared tensors: the hooks a method fills when its devices do not all exchange the
run's manifest as it is (LoRA at per-device ranks), and the identity every other method gets.

The run's manifest stays the one the backbone is built with (every device joins with its hash); a device's
layout narrows the run-shaped tensors to what that device trains and sends, and widens what it sent back to the
run's shapes, so admission, norm bounds and strategies see one shape per tensor. A plan may also replace the
mean of the tensors by its own merge (`MergeRound`): the server's strategy then sees tensors, never codec types.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import torch

from fedpeft_edge.peft.manifest import Manifest


class DeviceLayout:
    """One device's shapes: `manifest` is what it sends (and what its update is decoded against)."""

    def __init__(self, manifest: Manifest) -> None:
        self.manifest = manifest

    def narrow(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run-shaped tensors -> this device's shapes."""
        return dict(state)

    def widen(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This device's tensors -> run shapes (what it does not hold is zero)."""
        return dict(state)

    def start(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The run-shaped model this device trains from when handed `state`: widen(narrow(state))."""
        return self.widen(self.narrow(state))


class MergeRound(Protocol):
    """A round's merge in progress: each accepted device's run-shaped tensors with its weight, then the result."""

    def add(self, tensors: Mapping[str, torch.Tensor], weight: float) -> None: ...

    def result(self) -> dict[str, torch.Tensor]: ...


class ShapePlan:
    """The server's side: each device's layout and how updates merge. The default: one manifest for every device
    and the strategy's own mean."""

    name = "plain"
    merges = False  # True: merge_round() replaces the strategy's mean

    def assign(self, device_id: str, profile: Mapping[str, Any]) -> dict[str, Any] | None:
        """A joining device's assignment (e.g. its rank and why), or None if the plan assigns nothing."""
        return None

    def observe(self, device_id: str, train_s: float | None, deadline_s: float) -> dict[str, Any] | None:
        """A device's measured training time in a round: a changed assignment, or None."""
        return None

    def rank(self, device_id: str) -> int | None:
        """The rank a device's task names (None: the run's manifest as it is)."""
        return None

    def layout(self, device_id: str) -> DeviceLayout | None:
        """The device's layout (None: the run's manifest)."""
        return None

    def merge_round(self, global_state: Mapping[str, torch.Tensor]) -> MergeRound | None:
        """The plan's own merge for a round (None: the configured strategy's)."""
        return None
