"""Batch image transform from the backbone's timm data config: uint8 -> resized, normalised float, 3 channels.

`ImageTransform.from_spec(input_spec, image_size=None)` takes any object with `input_size` (3, H, W), `mean`,
`std` and `interpolation` (the backbone's `InputSpec`, or timm's resolved data config wrapped in a namespace);
`image_size` (data_args.image_size) overrides H and W. Calling it on a uint8 (B, C, H, W) tensor (C = 1, 3 or
4; grayscale is expanded to three channels, alpha dropped) returns float32 (B, 3, H', W'), computed with plain
torch ops (F.interpolate with antialiasing when shrinking), which beats per-image PIL/torchvision for the
small images we preload.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Protocol

import torch
import torch.nn.functional as F

from fedpeft_edge.errors import DataError

_MODES = {"bilinear": "bilinear", "bicubic": "bicubic", "nearest": "nearest"}


class InputSpecLike(Protocol):
    """What the data layer needs from the backbone's data config (fedpeft_edge.backbone.InputSpec)."""

    @property
    def input_size(self) -> Sequence[int]: ...

    @property
    def mean(self) -> Sequence[float]: ...

    @property
    def std(self) -> Sequence[float]: ...

    @property
    def interpolation(self) -> str: ...


def _three(values: Sequence[float], what: str) -> tuple[float, float, float]:
    v = tuple(float(x) for x in values)
    if len(v) == 1:
        v = v * 3
    if len(v) != 3:
        raise DataError(f"input spec {what} needs 1 or 3 values, got {values!r}; fix the backbone config")
    return v[0], v[1], v[2]


@dataclasses.dataclass(frozen=True)
class ImageTransform:
    """Resize to `size`, scale to [0, 1], normalise with mean/std; grayscale becomes three channels."""

    size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"

    @classmethod
    def from_spec(cls, spec: InputSpecLike, image_size: int | None = None) -> ImageTransform:
        """The transform for a backbone's input spec; `image_size` overrides its height and width."""
        dims = tuple(int(x) for x in spec.input_size)
        if len(dims) != 3 or dims[0] not in (1, 3) or min(dims) < 1:
            raise DataError(f"input spec input_size must be (3, H, W), got {spec.input_size!r}")
        size = (image_size, image_size) if image_size is not None else (dims[1], dims[2])
        if min(size) < 1:
            raise DataError(f"data_args.image_size must be >= 1, got {image_size}")
        std = _three(spec.std, "std")
        if min(std) <= 0:
            raise DataError(f"input spec std must be > 0, got {spec.std!r}")
        return cls(size, _three(spec.mean, "mean"), std, _MODES.get(str(spec.interpolation), "bilinear"))

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W) -> float32 (B, 3, size[0], size[1]), normalised."""
        if images.dim() != 4 or images.shape[1] not in (1, 3, 4):
            raise DataError(f"expected images (B, C, H, W) with C in 1, 3, 4, got {tuple(images.shape)}")
        x = images[:, :3].to(torch.float32).div_(255.0)
        if tuple(x.shape[-2:]) != self.size:
            shrink = x.shape[-2] > self.size[0] or x.shape[-1] > self.size[1]
            if self.interpolation == "nearest":
                x = F.interpolate(x, size=self.size, mode="nearest")
            else:
                x = F.interpolate(x, size=self.size, mode=self.interpolation, align_corners=False,
                                  antialias=shrink)
                x = x.clamp_(0.0, 1.0)  # bicubic overshoots
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        mean = torch.tensor(self.mean, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype).view(1, 3, 1, 1)
        return (x - mean) / std
