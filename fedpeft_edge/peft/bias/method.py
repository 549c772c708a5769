"""Bias tuning (BitFit): every bias term, BatchNorm affine weights and the head train and travel."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from fedpeft_edge.backbone import named_tensors, unwrap
from fedpeft_edge.peft.base import PeftMethod, head_names


class BiasMethod(PeftMethod):
    """Every parameter named `bias` (convs, linears, norms), every BatchNorm weight, and the head.

    On a ViT this is the paper's bias tuning (LayerNorm scales stay frozen); on a CNN the BatchNorm affine
    pair is the per-channel shift-and-scale that plays the bias role, so both halves train.
    """

    name = "bias"

    def _select(self, model: nn.Module) -> Iterable[str]:
        bn_weights = {id(m.weight) for m in unwrap(model).modules()
                      if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None}
        chosen = set(head_names(model))
        for key, tensor in named_tensors(model).items():
            if not isinstance(tensor, nn.Parameter):
                continue
            if key.rsplit(".", 1)[-1] == "bias" or id(tensor) in bn_weights:
                chosen.add(key)
        return chosen
