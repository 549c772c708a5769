"""A model replica shares the frozen tensors and owns the manifest's, buffers included; the allocator tuning."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from fedpeft_edge.backbone import named_tensors
from fedpeft_edge.client import allocator
from fedpeft_edge.client.runtime import replicate


def _model() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    for p in m.parameters():
        p.requires_grad_(False)
    m[1].bias.requires_grad_(True)
    m[3].weight.requires_grad_(True)
    return m


def test_replica_owns_the_manifest_tensors_and_shares_the_rest() -> None:
    model = _model()
    own = ["1.bias", "1.running_mean", "3.weight"]  # a BatchNorm buffer in the manifest, as bias-tuning has
    replica = replicate(model, own)
    a, b = named_tensors(model), named_tensors(replica)
    assert list(a) == list(b)
    for name in a:
        shared = a[name].data_ptr() == b[name].data_ptr()
        assert shared == (name not in own), name
    with torch.no_grad():
        b["1.running_mean"].add_(1.0)
        b["3.weight"].zero_()
    assert torch.count_nonzero(a["1.running_mean"]) == 0 and torch.count_nonzero(a["3.weight"]) > 0
    x = torch.randn(2, 3, 8, 8)
    model.eval()
    replica.eval()
    with torch.no_grad():
        b["1.running_mean"].copy_(a["1.running_mean"])
        b["3.weight"].copy_(a["3.weight"])
        assert torch.equal(model(x), replica(x))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_allocator_tuning_is_on_under_glibc_and_idempotent() -> None:
    assert allocator.tune() and allocator.tune()
    allocator.release()
