"""LoRA-aware merging of device updates: factor pairs found by name, the exact mean of their products, and the
truncated-SVD redistribution at a device's own rank (FlexLoRA, Bai et al., NeurIPS 2024).

Generic over models: a LoRA layer is any pair of shared tensors named `<layer>.lora_A.<p>` / `<layer>.lora_B.<p>`
(peft's names after backbone.canonical_name, for timm convs and linears and for HF q_proj/v_proj alike). The
rank is A's dim 0 and B's dim 1; a conv's kernel dims ride along (A: (r, in, kh, kw), B: (out, r, 1, 1)).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping

import torch

from fedpeft_edge.errors import PeftMethodError

_A, _B = ".lora_A.", ".lora_B."
_RANK_TOL = 1e-10  # singular values below this share of the largest count as zero
_FILL_SEED = 0x10AA


@dataclasses.dataclass(frozen=True)
class LoraPair:
    """One LoRA layer's factors by tensor name: `a` (rank on dim 0) and `b` (rank on dim 1)."""

    a: str
    b: str


def lora_pairs(names: Iterable[str]) -> tuple[LoraPair, ...]:
    """The LoRA layers among `names` (in the order their A appears); every A needs its B and the reverse."""
    names = list(names)
    known = set(names)
    pairs, unmatched = [], []
    for name in names:
        if _A in name:
            b = name.replace(_A, _B, 1)
            (pairs.append(LoraPair(name, b)) if b in known else unmatched.append(name))
        elif _B in name and name.replace(_B, _A, 1) not in known:
            unmatched.append(name)
    if unmatched:
        raise PeftMethodError(f"LoRA tensors without their other factor: {unmatched[:3]} ({len(unmatched)}); "
                              "a LoRA layer shares both lora_A and lora_B")
    return tuple(pairs)


def pair_rank(a: torch.Tensor | tuple[int, ...], b: torch.Tensor | tuple[int, ...]) -> int:
    """The rank of one layer's factors, checked to agree between A (dim 0) and B (dim 1)."""
    sa = tuple(a.shape) if isinstance(a, torch.Tensor) else tuple(a)
    sb = tuple(b.shape) if isinstance(b, torch.Tensor) else tuple(b)
    if len(sa) < 2 or len(sb) < 2 or sa[0] != sb[1]:
        raise PeftMethodError(f"LoRA factors of shapes A {sa} and B {sb} do not pair: A's dim 0 and B's dim 1 "
                              "are the rank")
    return sa[0]


def product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """B @ A as one float64 (out, in * kernel) matrix: what the layer adds to its frozen weight (unscaled)."""
    r = pair_rank(a, b)
    return b.to(torch.float64).reshape(b.shape[0], r) @ a.to(torch.float64).reshape(r, -1)


def factorize(prod: torch.Tensor, rank: int, a_shape: tuple[int, ...], b_shape: tuple[int, ...]
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of rank `rank` with B @ A the best rank-`rank` approximation of `prod` (Eckart-Young), split as
    A = sqrt(S) V^T, B = U sqrt(S). Components are ordered by singular value, so the first k of them are the
    rank-k truncation: a device given rank k takes a prefix. Components past the product's numerical rank
    have B = 0 (so the product is unchanged) and a fresh random A row.

    `a_shape`/`b_shape` give the trailing dims (kernel) of the layer; their rank dims are replaced by `rank`.
    """
    u, s, vh = torch.linalg.svd(prod.to(torch.float64), full_matrices=False)
    live = int((s > s[0] * _RANK_TOL).sum()) if s.numel() and s[0] > 0 else 0
    k = min(rank, live)
    root = s[:k].sqrt()
    b = torch.zeros(prod.shape[0], rank, dtype=torch.float64)
    # Components past the product's rank get B = 0 and a random A row (peft's init range, fixed seed): B @ A is
    # unchanged, and B can learn there. With A = 0 too they would be dead for good (zero gradients both ways):
    # a mean of a few low-rank products would cap every later round's rank.
    gen = torch.Generator().manual_seed(_FILL_SEED)
    bound = 1.0 / math.sqrt(prod.shape[1])
    a = torch.rand(rank, prod.shape[1], generator=gen, dtype=torch.float64).mul_(2 * bound).sub_(bound)
    b[:, :k] = u[:, :k] * root
    a[:k] = root[:, None] * vh[:k]
    return a.reshape(rank, *a_shape[1:]), b.reshape(b_shape[0], rank, *b_shape[2:])


def truncate(state: Mapping[str, torch.Tensor], pairs: Iterable[LoraPair], rank: int) -> dict[str, torch.Tensor]:
    """`state` with every LoRA pair cut to its first `rank` components (views, not copies); others unchanged."""
    out = dict(state)
    for p in pairs:
        out[p.a] = state[p.a][:rank]
        out[p.b] = state[p.b][:, :rank]
    return out


def pad(state: Mapping[str, torch.Tensor], pairs: Iterable[LoraPair], rank: int) -> dict[str, torch.Tensor]:
    """`state` with every LoRA pair zero-filled up to `rank` components. Zero components stay zero under
    training (their gradients are products with the other zero factor), so a model of rank r holding k < r
    live components trains as a rank-k model."""
    out = dict(state)
    for p in pairs:
        a, b = state[p.a], state[p.b]
        k = pair_rank(a, b)
        if k > rank:
            raise PeftMethodError(f"{p.a}: rank {k} exceeds the model's rank {rank}")
        if k == rank:
            continue
        wa = torch.zeros((rank, *a.shape[1:]), dtype=a.dtype)
        wa[:k] = a
        wb = torch.zeros((b.shape[0], rank, *b.shape[2:]), dtype=b.dtype)
        wb[:, :k] = b
        out[p.a], out[p.b] = wa, wb
    return out


class ProductMean:
    """The sample-weighted mean of the devices' LoRA products (float64, exact: no factor is averaged) and of
    their other shared tensors (the head), redistributed at the run's rank by `result`.

    `global_state` fixes the names, order, dtypes and rank; devices' factors may be of any rank up to it.
    """

    def __init__(self, global_state: Mapping[str, torch.Tensor]) -> None:
        self.global_state = global_state
        self.pairs = lora_pairs(global_state)
        in_pairs = {n for p in self.pairs for n in (p.a, p.b)}
        self._prod = {p: torch.zeros(global_state[p.b].shape[0], math.prod(global_state[p.a].shape[1:]),
                                     dtype=torch.float64) for p in self.pairs}
        self._other = {n: torch.zeros(g.shape, dtype=torch.float64) for n, g in global_state.items()
                       if n not in in_pairs}
        self.total = 0.0

    def add(self, tensors: Mapping[str, torch.Tensor], weight: float) -> None:
        """Add one device's tensors with `weight` (its sample count)."""
        if not weight > 0:
            raise PeftMethodError(f"a LoRA update needs a positive weight (samples), got {weight}")
        for p, acc in self._prod.items():
            acc.add_(product(tensors[p.a], tensors[p.b]), alpha=weight)
        for n, acc in self._other.items():
            acc.add_(tensors[n].to(torch.float64), alpha=weight)
        self.total += weight

    def products(self) -> dict[LoraPair, torch.Tensor]:
        """The weighted mean product of each layer (before any SVD)."""
        self._require()
        return {p: acc / self.total for p, acc in self._prod.items()}

    def result(self) -> dict[str, torch.Tensor]:
        """The next global tensors: each mean product factorised at the run's rank, the rest averaged."""
        prods = self.products()
        out: dict[str, torch.Tensor] = {}
        factors: dict[str, torch.Tensor] = {}
        for p, prod in prods.items():
            ga, gb = self.global_state[p.a], self.global_state[p.b]
            factors[p.a], factors[p.b] = factorize(prod, pair_rank(ga, gb), tuple(ga.shape), tuple(gb.shape))
        for name, g in self.global_state.items():
            value = factors[name] if name in factors else self._other[name] / self.total
            out[name] = value.to(g.dtype)
        return out

    def _require(self) -> None:
        if not self.total:
            raise PeftMethodError("cannot merge a round with no accepted LoRA updates")
