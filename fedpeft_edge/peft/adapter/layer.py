"""The bottleneck adapter module: x + up(act(down(x))), starting as the identity."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class BottleneckAdapter(nn.Module):
    """dim -> width -> dim with a residual; random down and zero up projection, so it starts as identity.

    The paper's code zero-initialised both projections, so under SGD neither ever moves (the gradient of each
    is multiplied by the other). A random down projection lets the zero up projection learn from step one.
    """

    def __init__(self, dim: int, width: int) -> None:
        super().__init__()
        self.down = nn.Linear(dim, width)
        self.act = nn.GELU()
        self.up = nn.Linear(width, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(self.act(self.down(x)))

    def after(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        """Forward hook body: adapt the hooked module's output (a bound method, so deepcopy re-binds it)."""
        return self(output)
