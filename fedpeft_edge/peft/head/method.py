"""Head tuning (linear probe): only the new classifier trains and travels."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from fedpeft_edge.peft.base import PeftMethod, head_names


class HeadMethod(PeftMethod):
    """The classifier returned by timm's get_classifier() trains; the whole backbone is frozen."""

    name = "head"

    def _select(self, model: nn.Module) -> Iterable[str]:
        return head_names(model)
