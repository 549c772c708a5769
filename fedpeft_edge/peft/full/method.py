"""Full fine-tuning: every parameter trains and travels."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from fedpeft_edge.peft.base import PeftMethod, parameter_names


class FullMethod(PeftMethod):
    """Every parameter (BatchNorm affine terms included) trains and is shared.

    Buffers do not travel: BatchNorm running statistics stay as loaded (BN layers run in eval mode, see
    training.py), so they are part of the backbone fingerprint and never drift apart across devices.
    """

    name = "full"

    def _select(self, model: nn.Module) -> Iterable[str]:
        return parameter_names(model)
