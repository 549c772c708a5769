"""Tiny backbones for the PEFT tests (imported by them): a 2-block ViT at 32 px and small timm CNNs, weight-free."""

from __future__ import annotations

import torch
from torch import nn

from fedpeft_edge.backbone import create_timm_model

TINY_VIT = ("vit_tiny_patch16_224",
            {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2})
TINY_CNN = ("tf_efficientnet_lite0", {})
TINY_RESNET = ("resnet10t", {})
MODELS = {"vit": TINY_VIT, "cnn": TINY_CNN, "resnet": TINY_RESNET}
NUM_CLASSES = 5


def build(kind: str, seed: int = 0) -> nn.Module:
    """A seeded tiny model of `kind` ("vit", "cnn", "resnet") with a 5-class head."""
    name, kwargs = MODELS[kind]
    torch.manual_seed(seed)
    return create_timm_model(name, NUM_CLASSES, kwargs)


def batch(seed: int = 1, n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, NUM_CLASSES, (n,), generator=g)
