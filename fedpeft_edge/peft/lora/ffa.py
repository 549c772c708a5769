"""FFA-LoRA (Sun et al., ICLR 2024): every lora_A frozen at a random matrix all devices derive from the run's seed,
only B trained and shared, so the mean of the devices' B @ A is exactly mean(B) @ A."""

from __future__ import annotations

import math
import zlib

import torch
from torch import nn

from fedpeft_edge.backbone import named_tensors


def freeze_lora_a(model: nn.Module, seed: int) -> int:
    """Draw every lora_A from U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (peft's kaiming_uniform(a=sqrt(5)) range) with a
    generator seeded from (`seed`, the tensor's canonical name): the same matrix on every device and the server,
    whatever else consumed the global RNG. The tensors are frozen, so the backbone fingerprint covers them and a
    device that drew another A is refused at join. Returns how many tensors were drawn."""
    count = 0
    with torch.no_grad():
        for name, t in named_tensors(model).items():
            if ".lora_A." not in name or not isinstance(t, nn.Parameter):
                continue
            gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
            bound = 1.0 / math.sqrt(math.prod(t.shape[1:]))
            t.copy_(torch.rand(t.shape, generator=gen, dtype=torch.float64).mul_(2 * bound).sub_(bound))
            t.requires_grad_(False)
            count += 1
    return count
