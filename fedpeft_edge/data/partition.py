"""Seeded, pure partitions of a labelled pool across clients: IID, Dirichlet label skew and class shards.

Every function here is a pure function of (labels, number of clients, seed, options): every device computes
the whole partition from the labels alone and keeps only the part its `client_index` selects, so agents load
nothing but their own shard.

API
- `partition_iid(num_samples, num_clients, seed, min_size=1) -> list[np.ndarray]`
- `partition_dirichlet(labels, num_clients, alpha, seed, min_size=10, num_classes=None) -> list[np.ndarray]`
  (label skew as in FedPEFT/FedML: per class, proportions ~ Dir(alpha); clients already above the mean size
  receive no more; resampled until every client holds at least `min_size` samples)
- `partition_shards(labels, num_clients, shards_per_client, seed, min_size=1, num_classes=None)`
  (every client holds exactly `shards_per_client` classes; each class is split evenly among its holders)
- `partition_labels(labels, data_args, num_clients, seed, num_classes=None)`: dispatch on
  `data_args.partition_method`
- `split_train_test(indices, test_fraction, seed, client_index) -> (train, test)`: the per-client split
- `client_indices(labels, data_args, num_clients, seed, client_index, num_classes=None) -> (train, test)`:
  the whole spec for one client: optional `max_train_samples` cap of the pool, partition, per-client split
- `partition_pool(labels, data_args, num_clients, seed, num_classes=None) -> list[np.ndarray]`: every client's
  part after the seeded `max_train_samples` cap of the pool
- `partition_digest(parts) -> str`: SHA-256 of a partition (devices can report it; equal digest = equal split)

Results are sorted int64 positions into `labels`; the parts of a partition are disjoint and cover the pool.

Determinism: generators are `numpy.random.Generator(PCG64(SeedSequence([seed, purpose, ...])))`; only
`Generator.random()` (uniform doubles, a stable bit stream) is drawn, and permutations, normals and gamma
variates are derived from it here, because numpy does not promise stable streams for `permutation` or
`dirichlet` across versions, and devices in one run may run different numpy versions.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from fedpeft_edge.config import DataArgs
from fedpeft_edge.errors import DataError

# Purposes mixed into every seed, so that the same run seed gives independent streams per use.
_PURPOSE_PARTITION = 1
_PURPOSE_SPLIT = 2
_PURPOSE_SUBSET = 3
_MAX_DIRICHLET_ATTEMPTS = 1000


def make_rng(seed: int, *purpose: int) -> np.random.Generator:
    """A PCG64 generator for `seed` and a purpose tuple; identical on every machine and numpy version."""
    if seed < 0:
        raise DataError(f"seed must be >= 0, got {seed}; use common_args.random_seed >= 0")
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, *purpose])))


def permutation(rng: np.random.Generator, n: int) -> np.ndarray:
    """A random permutation of range(n) derived only from uniform doubles (stable across numpy versions)."""
    return np.argsort(rng.random(n), kind="stable").astype(np.int64)


def dirichlet(rng: np.random.Generator, alpha: float, k: int) -> np.ndarray:
    """One draw from a symmetric Dirichlet(alpha) over k parts, in log space (safe for tiny alpha)."""
    log_g = _log_gamma_variates(rng, alpha + 1.0, k) + np.log1p(-rng.random(k)) / alpha
    p = np.exp(log_g - log_g.max())
    return p / p.sum()


def _log_gamma_variates(rng: np.random.Generator, shape: float, n: int) -> np.ndarray:
    """log of n Gamma(shape, 1) variates, shape >= 1 (Marsaglia-Tsang with Box-Muller normals)."""
    d = shape - 1.0 / 3.0
    c = 1.0 / np.sqrt(9.0 * d)
    out = np.empty(0)
    while out.size < n:
        m = n - out.size
        u1, u2, u3 = 1.0 - rng.random(m), rng.random(m), 1.0 - rng.random(m)
        x = np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)
        v = (1.0 + c * x) ** 3
        ok = v > 0
        log_v = np.log(np.where(ok, v, 1.0))
        ok &= np.log(u3) < 0.5 * x * x + d - d * v + d * log_v
        out = np.concatenate([out, np.log(d) + log_v[ok]])
    return out[:n]


def _check_counts(num_samples: int, num_clients: int, min_size: int) -> None:
    if num_clients < 1:
        raise DataError(f"num_clients must be >= 1, got {num_clients}; set train_args.client_num_in_total")
    if num_clients * min_size > num_samples:
        raise DataError(
            f"{num_samples} samples cannot give {num_clients} clients at least {min_size} each; lower "
            "data_args.min_samples_per_client or the number of clients, or raise data_args.max_train_samples"
        )


def _check_labels(labels: np.ndarray, num_classes: int | None) -> tuple[np.ndarray, int]:
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"labels must be a non-empty 1-D int array, got shape {labels.shape} {labels.dtype}")
    k = int(labels.max()) + 1 if num_classes is None else num_classes
    bad = np.flatnonzero((labels < 0) | (labels >= k))
    if bad.size:
        raise DataError(
            f"label {int(labels[bad[0]])} at position {int(bad[0])} is outside [0, {k}); "
            "fix the data set's labels or its number of classes"
        )
    return labels.astype(np.int64), k


def _finish(parts: Sequence[Any], min_size: int, what: str) -> list[np.ndarray]:
    out = [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    small = [i for i, p in enumerate(out) if p.size < min_size]
    if small:
        raise DataError(
            f"{what}: client {small[0]} gets {out[small[0]].size} samples, fewer than "
            f"min_samples_per_client={min_size}; use fewer clients, more shards per client or a lower "
            "data_args.min_samples_per_client"
        )
    return out


def partition_iid(num_samples: int, num_clients: int, seed: int, min_size: int = 1) -> list[np.ndarray]:
    """Uniformly random, near-equal parts (sizes differ by at most one)."""
    _check_counts(num_samples, num_clients, min_size)
    order = permutation(make_rng(seed, _PURPOSE_PARTITION), num_samples)
    return _finish(np.array_split(order, num_clients), min_size, "iid partition")


def partition_dirichlet(
    labels: np.ndarray,
    num_clients: int,
    alpha: float,
    seed: int,
    min_size: int = 10,
    num_classes: int | None = None,
) -> list[np.ndarray]:
    """Label skew: per class, proportions ~ Dir(alpha); resampled until every client has >= min_size."""
    labels, k = _check_labels(labels, num_classes)
    if not alpha > 0:
        raise DataError(f"Dirichlet alpha must be > 0, got {alpha}; set data_args.partition_alpha (eg 0.1)")
    _check_counts(labels.size, num_clients, min_size)
    rng = make_rng(seed, _PURPOSE_PARTITION)
    by_class = [np.flatnonzero(labels == c) for c in range(k)]
    for _ in range(_MAX_DIRICHLET_ATTEMPTS):
        parts = _dirichlet_once(rng, by_class, num_clients, alpha, labels.size)
        if min(len(p) for p in parts) >= min_size:
            return _finish(parts, min_size, "dirichlet partition")
    raise DataError(
        f"no Dirichlet(alpha={alpha}) partition of {labels.size} samples over {num_clients} clients gave "
        f"every client {min_size} samples in {_MAX_DIRICHLET_ATTEMPTS} draws; raise "
        "data_args.partition_alpha or lower data_args.min_samples_per_client"
    )


def _dirichlet_once(
    rng: np.random.Generator, by_class: list[np.ndarray], num_clients: int, alpha: float, total: int
) -> list[list[int]]:
    parts: list[list[int]] = [[] for _ in range(num_clients)]
    mean_size = total / num_clients
    for idx in by_class:
        idx = idx[permutation(rng, idx.size)]
        p = dirichlet(rng, alpha, num_clients)
        p = p * np.array([len(part) < mean_size for part in parts], dtype=np.float64)
        p = p / p.sum() if p.sum() > 0 else np.full(num_clients, 1.0 / num_clients)
        cuts = (np.cumsum(p) * idx.size).astype(np.int64)[:-1]
        for part, piece in zip(parts, np.split(idx, cuts), strict=True):
            part.extend(piece.tolist())
    return parts


def partition_shards(
    labels: np.ndarray,
    num_clients: int,
    shards_per_client: int,
    seed: int,
    min_size: int = 1,
    num_classes: int | None = None,
) -> list[np.ndarray]:
    """Pathological non-IID: each client holds exactly `shards_per_client` classes, split among holders."""
    labels, k = _check_labels(labels, num_classes)
    if not 1 <= shards_per_client <= k:
        raise DataError(f"shards_per_client must be in 1..{k} (the class count), got {shards_per_client}")
    if num_clients * shards_per_client < k:
        raise DataError(
            f"{num_clients} clients x {shards_per_client} classes each leave some of {k} classes unassigned; "
            f"raise data_args.shards_per_client to >= {-(-k // num_clients)} or use more clients"
        )
    _check_counts(labels.size, num_clients, min_size)
    rng = make_rng(seed, _PURPOSE_PARTITION)
    class_order = permutation(rng, k)
    holders: list[list[int]] = [[] for _ in range(k)]
    for client in range(num_clients):
        for j in range(shards_per_client):
            holders[int(class_order[(client * shards_per_client + j) % k])].append(client)
    parts: list[list[int]] = [[] for _ in range(num_clients)]
    for c in range(k):
        idx = np.flatnonzero(labels == c)
        idx = idx[permutation(rng, idx.size)]
        for client, piece in zip(holders[c], np.array_split(idx, len(holders[c])), strict=True):
            parts[client].extend(piece.tolist())
    return _finish(parts, min_size, f"shards partition ({shards_per_client} classes per client)")


def partition_labels(
    labels: np.ndarray, data_args: DataArgs, num_clients: int, seed: int, num_classes: int | None = None
) -> list[np.ndarray]:
    """The partition `data_args.partition_method` names, over positions 0..len(labels)-1."""
    method, min_size = data_args.partition_method, data_args.min_samples_per_client
    if method == "iid":
        return partition_iid(len(labels), num_clients, seed, min_size)
    if method == "dirichlet":
        alpha = data_args.partition_alpha
        return partition_dirichlet(labels, num_clients, alpha, seed, min_size, num_classes)
    if method == "shards":
        return partition_shards(labels, num_clients, data_args.shards_per_client, seed, min_size, num_classes)
    raise DataError(f"unknown data_args.partition_method {method!r}; use 'iid', 'dirichlet' or 'shards'")


def split_train_test(
    indices: np.ndarray, test_fraction: float, seed: int, client_index: int
) -> tuple[np.ndarray, np.ndarray]:
    """A client's local split: floor(n * test_fraction) random samples test, the rest (never empty) train."""
    if not 0.0 <= test_fraction < 1.0:
        raise DataError(f"test_fraction must be in [0, 1), got {test_fraction}; fix data_args.test_fraction")
    indices = np.asarray(indices, dtype=np.int64)
    n_test = min(int(indices.size * test_fraction), max(indices.size - 1, 0))
    order = permutation(make_rng(seed, _PURPOSE_SPLIT, client_index), indices.size)
    return np.sort(indices[order[n_test:]]), np.sort(indices[order[:n_test]])


def subset_pool(
    num_samples: int, max_samples: int | None, seed: int, purpose: int = _PURPOSE_SUBSET
) -> np.ndarray:
    """All positions, or a seeded random `max_samples` of them (sorted) when a cap is set and smaller."""
    if max_samples is None or max_samples >= num_samples:
        return np.arange(num_samples, dtype=np.int64)
    return np.sort(permutation(make_rng(seed, purpose), num_samples)[:max_samples])


def client_indices(
    labels: np.ndarray,
    data_args: DataArgs,
    num_clients: int,
    seed: int,
    client_index: int,
    num_classes: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) positions into `labels` for one client: cap the pool, partition, split its part."""
    check_client_index(client_index, num_clients)
    parts = partition_pool(labels, data_args, num_clients, seed, num_classes)
    return split_train_test(parts[client_index], data_args.test_fraction, seed, client_index)


def partition_pool(
    labels: np.ndarray, data_args: DataArgs, num_clients: int, seed: int, num_classes: int | None = None
) -> list[np.ndarray]:
    """Every client's part as positions into `labels`, after the seeded `max_train_samples` pool cap."""
    pool = subset_pool(len(labels), data_args.max_train_samples, seed)
    parts = partition_labels(np.asarray(labels)[pool], data_args, num_clients, seed, num_classes)
    return [pool[p] for p in parts]


def partition_digest(parts: Sequence[np.ndarray]) -> str:
    """SHA-256 hex over the parts (sizes and int64 little-endian positions): equal digest = same partition."""
    h = hashlib.sha256()
    for p in parts:
        arr = np.ascontiguousarray(np.asarray(p, dtype="<i8"))
        h.update(len(arr).to_bytes(8, "little"))
        h.update(arr.tobytes())
    return h.hexdigest()


def check_client_index(client_index: int, num_clients: int) -> None:
    """A DataError unless 0 <= client_index < num_clients."""
    if not 0 <= client_index < num_clients:
        raise DataError(
            f"client_index {client_index} is outside [0, {num_clients}); pass a device index in range or "
            "raise train_args.client_num_in_total"
        )
