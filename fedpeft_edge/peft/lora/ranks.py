"""Heterogeneous LoRA ranks (flexlora): a device's layout at its rank, and the server's plan that gives each device
a rank from its measured profile (memory) and its measured training time against the round deadline.

Every model is built at the run's rank r (`peft_args.lora.r`), so every device joins with the same manifest and
backbone fingerprint. A device given rank k < r holds zeros in components k..r-1 (they stay zero in training),
sends only its first k components and is handed the first k components of the global factors, which are the
rank-k truncated SVD of the mean product (aggregation.factorize orders them by singular value).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping
from typing import Any

import torch

from fedpeft_edge.config import LoraArgs
from fedpeft_edge.errors import PeftMethodError
from fedpeft_edge.peft.base import Manifest, TensorSpec
from fedpeft_edge.peft.lora.aggregation import LoraPair, ProductMean, lora_pairs, pad, pair_rank, truncate
from fedpeft_edge.peft.shapes import DeviceLayout, MergeRound, ShapePlan

log = logging.getLogger(__name__)


def manifest_rank(manifest: Manifest) -> int:
    """The run's LoRA rank as its manifest holds it (every pair has it)."""
    specs = {t.name: t for t in manifest.tensors}
    ranks = {pair_rank(specs[p.a].shape, specs[p.b].shape) for p in lora_pairs(manifest.names)}
    if len(ranks) != 1:
        raise PeftMethodError(f"manifest {manifest.hash[:12]} holds LoRA layers of ranks {sorted(ranks)}; "
                              "flexlora needs one rank r for the run's model")
    return ranks.pop()


class LoraLayout(DeviceLayout):
    """A device at rank `rank` <= the run's rank: the first `rank` components of every LoRA pair."""

    def __init__(self, run_manifest: Manifest, rank: int) -> None:
        self.pairs: tuple[LoraPair, ...] = lora_pairs(run_manifest.names)
        self.run_rank = manifest_rank(run_manifest)
        if not 1 <= rank <= self.run_rank:
            raise PeftMethodError(f"LoRA rank {rank} is outside 1..{self.run_rank} (peft_args.lora.r)")
        self.rank = rank
        super().__init__(run_manifest if rank == self.run_rank else _at_rank(run_manifest, self.pairs, rank))

    def narrow(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.rank == self.run_rank:
            return dict(state)
        cut = truncate(state, self.pairs, self.rank)
        return {k: v.contiguous() for k, v in cut.items()}

    def widen(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return dict(state) if self.rank == self.run_rank else pad(state, self.pairs, self.run_rank)


def _at_rank(manifest: Manifest, pairs: tuple[LoraPair, ...], rank: int) -> Manifest:
    dims = {p.a: 0 for p in pairs} | {p.b: 1 for p in pairs}
    specs = []
    for t in manifest.tensors:
        shape = list(t.shape)
        if t.name in dims:
            shape[dims[t.name]] = rank
        specs.append(TensorSpec(t.name, tuple(shape), t.dtype))
    return Manifest(method=manifest.method, tensors=tuple(specs))


def profile_memory(profile: Mapping[str, Any]) -> tuple[float | None, str]:
    """The memory that bounds a device's training, from its join profile: the GPU's if it trains on CUDA (a Jetson
    shares its RAM with the GPU, so its RAM figure is the same memory), else its RAM. (MB, the profile key)."""
    cuda = profile.get("cuda_mem_total_mb")
    if profile.get("cuda_available") and isinstance(cuda, (int, float)) and cuda > 0:
        return float(cuda), "cuda_mem_total_mb"
    ram = profile.get("ram_total_mb")
    source = "ram_total_mb, emulated" if profile.get("memory_emulated") else "ram_total_mb"
    return (float(ram), source) if isinstance(ram, (int, float)) and ram > 0 else (None, "unknown")


def rank_for_memory(memory_mb: float | None, low: int, high: int, bounds_mb: tuple[float, ...]) -> int:
    """low at or below bounds_mb[0], high at or above bounds_mb[1], log-linear between (unknown memory: low)."""
    if memory_mb is None:
        return low
    lo, hi = bounds_mb[0], bounds_mb[1]
    frac = min(1.0, max(0.0, math.log(memory_mb / lo) / math.log(hi / lo)))
    return low + math.floor(frac * (high - low) + 1e-9)


@dataclasses.dataclass
class _Assignment:
    rank: int
    cap: int  # what its memory allows
    memory_mb: float | None
    memory_source: str
    reason: str

    def record(self, low: int, high: int) -> dict[str, Any]:
        return {"rank": self.rank, "rank_min": low, "rank_max": high, "memory_mb": self.memory_mb,
                "memory_source": self.memory_source, "reason": self.reason}


class LoraRankPlan(ShapePlan):
    """flexlora on the server: ranks by capability, devices' layouts, and the product merge."""

    name = "flexlora"
    merges = True

    def __init__(self, manifest: Manifest, args: LoraArgs) -> None:
        self.manifest = manifest
        self.high = manifest_rank(manifest)
        self.low = self.high if args.rank_min is None else args.rank_min
        self.args = args
        self._devices: dict[str, _Assignment] = {}
        self._layouts: dict[int, LoraLayout] = {}

    def assign(self, device_id: str, profile: Mapping[str, Any]) -> dict[str, Any]:
        mem, source = profile_memory(profile)
        cap = rank_for_memory(mem, self.low, self.high, self.args.rank_memory_mb)
        lo, hi = self.args.rank_memory_mb
        where = f"{mem:.0f} MB ({source})" if mem is not None else "memory unknown in the profile"
        reason = (f"memory: {where} on the log scale {lo:.0f}..{hi:.0f} MB -> rank {cap} of "
                  f"{self.low}..{self.high}")
        self._devices[device_id] = _Assignment(cap, cap, mem, source, reason)
        log.info("device %s: LoRA rank %d (%s)", device_id, cap, reason)
        return self._devices[device_id].record(self.low, self.high)

    def observe(self, device_id: str, train_s: float | None, deadline_s: float) -> dict[str, Any] | None:
        a = self._devices.get(device_id)
        if a is None or train_s is None:
            return None
        share = train_s / deadline_s
        limit = self.args.rank_time_fraction
        if share > limit and a.rank > self.low:
            new, why = max(self.low, a.rank // 2), "halved"
        elif share < limit / 4 and a.rank < a.cap:
            new, why = min(a.cap, a.rank * 2), "doubled back toward its memory's rank"
        else:
            return None
        a.reason = (f"deadline: training took {train_s:.1f} s = {share:.0%} of the {deadline_s:g} s deadline "
                    f"(limit {limit:.0%}): rank {a.rank} {why} -> {new}")
        a.rank = new
        log.info("device %s: LoRA rank %d (%s)", device_id, new, a.reason)
        return a.record(self.low, self.high)

    def rank(self, device_id: str) -> int | None:
        a = self._devices.get(device_id)
        return a.rank if a is not None else self.high

    def layout(self, device_id: str) -> LoraLayout:
        rank = self.rank(device_id) or self.high
        if rank not in self._layouts:
            self._layouts[rank] = LoraLayout(self.manifest, rank)
        return self._layouts[rank]

    def merge_round(self, global_state: Mapping[str, torch.Tensor]) -> MergeRound:
        return ProductMean(global_state)
