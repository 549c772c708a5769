"""A method's own merge as a strategy (peft/shapes.py `MergeRound`, e.g. LoRA's product mean): the strategy sees
run-shaped tensors and sample counts, the method decides how they combine."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from fedpeft_edge.errors import ProtocolError
from fedpeft_edge.peft.shapes import MergeRound, ShapePlan
from fedpeft_edge.server.strategy.base import Aggregation, ClientUpdate, Strategy, effective_local


class _Merging(Aggregation):
    def __init__(self, strategy: Strategy, global_state: Mapping[str, torch.Tensor], merge: MergeRound) -> None:
        super().__init__(strategy, global_state)
        self._merge = merge
        self._g64: dict[str, torch.Tensor] | None = None

    def add(self, update: ClientUpdate) -> None:
        if update.num_samples <= 0:
            raise ProtocolError(f"update from {update.device_id} reports {update.num_samples} samples; "
                                "every update needs num_samples > 0")
        tensors = update.tensors
        if update.is_delta or update.scale != 1.0:  # a local model: global + scale * delta
            if self._g64 is None:
                self._g64 = {n: g.to(torch.float64) for n, g in self.global_state.items()}
            tensors = {n: effective_local(n, g64, update) for n, g64 in self._g64.items()}
        self._merge.add(tensors, update.num_samples)
        self.count += 1

    def result(self) -> dict[str, torch.Tensor]:
        if not self.count:
            raise ProtocolError("cannot aggregate a round with no accepted updates")
        return self._merge.result()


class MergeStrategy(Strategy):
    """Each round's updates go into `begin_merge(global_state)` as they arrive (O(model) memory)."""

    def __init__(self, begin_merge: Callable[[Mapping[str, torch.Tensor]], MergeRound | None], name: str) -> None:
        self._begin_merge = begin_merge
        self.name = name

    def begin(self, global_state: Mapping[str, torch.Tensor]) -> Aggregation:
        merge = self._begin_merge(global_state)
        if merge is None:
            raise ProtocolError(f"{self.name}: the method's plan gave no merge for this round")
        return _Merging(self, global_state, merge)

    def aggregate(
        self, global_state: Mapping[str, torch.Tensor], updates: Sequence[ClientUpdate]
    ) -> dict[str, torch.Tensor]:
        agg = self.begin(global_state)
        for u in updates:
            agg.add(u)
        return agg.result()


def with_plan(strategy: Strategy, plan: ShapePlan) -> Strategy:
    """The plan's own merge in place of `strategy` when the plan has one (config checks the strategy allows it)."""
    if not plan.merges:
        return strategy
    return MergeStrategy(plan.merge_round, f"{strategy.name}+{plan.name}")
