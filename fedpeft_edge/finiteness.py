"""Finiteness of tensors and arrays: one read-only summing pass, the exact element test only when it fails.

The codec checks every tensor that enters a process here (decode) and every tensor it puts on the wire (encode);
`peft.base.check_state` for states set from anywhere else. Kept apart from the codec so that peft/ need not
import wire/.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def all_finite(t: torch.Tensor) -> bool:
    """Whether a tensor holds no NaN or infinity: one read-only sum (NaN/inf anywhere make it non-finite),
    and the exact element test only when that sum is not finite (it may just have overflowed). Against
    torch.isfinite(t).all(), which runs three kernels and allocates two masks: 1.2x cheaper at 846 values,
    5x at 54k, 13x at 1M (one thread)."""
    if t.numel() == 0 or not t.is_floating_point():
        return True
    return _sum_is_finite(t) or bool(torch.isfinite(t).all())


def _sum_is_finite(t: torch.Tensor) -> bool:
    """One read-only pass: NaN/inf anywhere make the sum non-finite (numpy: no thread-pool wake-ups)."""
    t = t.detach()
    if t.dtype == torch.bfloat16 or t.device.type != "cpu":
        return bool(torch.isfinite(t.sum(dtype=torch.float32)))
    return array_is_finite(t.numpy())


def array_is_finite(arr: np.ndarray) -> bool:
    """Whether the sum of an array is finite (False: NaN/inf somewhere, or an overflow; then check exactly)."""
    with np.errstate(over="ignore", invalid="ignore"):  # an overflowing sum only sends us to the exact check
        return bool(np.isfinite(_sum(arr)))


def arrays_finite(arrays: list[np.ndarray]) -> bool:
    """array_is_finite of each, under one errstate (entering one costs more than summing a bias vector)."""
    with np.errstate(over="ignore", invalid="ignore"):
        sums = [_sum(a) for a in arrays if a.size]
    return bool(np.isfinite(sums).all()) if sums else True


def _sum(arr: np.ndarray) -> Any:
    """One read-only pass: NaN/inf anywhere make it non-finite (float32 accumulation unless float64)."""
    return np.add.reduce(arr, axis=None, dtype=np.float64 if arr.dtype == np.float64 else np.float32)
