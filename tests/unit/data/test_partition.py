"""Partitions: exact cover, determinism across processes and numpy versions, seeds, minimum size, skew."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import numpy as np
import pytest

from fedpeft_edge.config import DataArgs
from fedpeft_edge.data.partition import (
    client_indices,
    partition_digest,
    partition_dirichlet,
    partition_iid,
    partition_labels,
    partition_pool,
    partition_shards,
)
from fedpeft_edge.data.stats import label_entropy
from fedpeft_edge.errors import DataError

LABELS = np.repeat(np.arange(10), 300)  # 3,000 samples, balanced
METHODS = {
    "iid": DataArgs(partition_method="iid"),
    "dir0.1": DataArgs(partition_method="dirichlet", partition_alpha=0.1),
    "dir0.5": DataArgs(partition_method="dirichlet", partition_alpha=0.5),
    "shards": DataArgs(partition_method="shards", shards_per_client=2),
}


def _assert_exact_cover(parts: list[np.ndarray], n: int) -> None:
    allidx = np.concatenate(parts)
    assert allidx.size == n
    assert np.array_equal(np.sort(allidx), np.arange(n))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_partition_covers_every_sample_exactly_once(name: str) -> None:
    parts = partition_labels(LABELS, METHODS[name], 8, seed=3)
    assert len(parts) == 8
    _assert_exact_cover(parts, LABELS.size)
    assert min(p.size for p in parts) >= METHODS[name].min_samples_per_client


@pytest.mark.parametrize("name", sorted(METHODS))
def test_partition_differs_between_seeds_and_repeats_for_one_seed(name: str) -> None:
    a = partition_digest(partition_labels(LABELS, METHODS[name], 8, seed=1))
    b = partition_digest(partition_labels(LABELS, METHODS[name], 8, seed=1))
    c = partition_digest(partition_labels(LABELS, METHODS[name], 8, seed=2))
    assert a == b
    assert a != c


_CHILD = """
import json, numpy as np
from fedpeft_edge.config import DataArgs
from fedpeft_edge.data.partition import partition_digest, partition_labels
labels = np.repeat(np.arange(10), 300)
methods = {methods}
digest = {{k: partition_digest(partition_labels(labels, DataArgs(**v), 8, 7)) for k, v in methods.items()}}
print(json.dumps(digest))
"""


def test_partition_is_identical_in_another_process() -> None:
    methods: dict[str, dict[str, Any]] = {
        "iid": {"partition_method": "iid"},
        "dir0.1": {"partition_method": "dirichlet", "partition_alpha": 0.1},
        "shards": {"partition_method": "shards", "shards_per_client": 3},
    }
    out = subprocess.run(
        [sys.executable, "-c", _CHILD.format(methods=repr(methods))],
        capture_output=True, text=True, timeout=120, check=True,
    )
    child = json.loads(out.stdout.strip().splitlines()[-1])
    mine = {
        k: partition_digest(partition_labels(LABELS, DataArgs(**v), 8, seed=7))
        for k, v in methods.items()
    }
    assert child == mine


def test_partition_matches_pinned_digest() -> None:
    # Pinned so a numpy upgrade or a code change that moves devices' shards is caught: devices in one run must
    # agree on the partition even when their numpy versions differ.
    parts = partition_dirichlet(np.arange(1000) % 10, 5, alpha=0.5, seed=0, min_size=10)
    assert partition_digest(parts) == PINNED_DIRICHLET_DIGEST


PINNED_DIRICHLET_DIGEST = "36d5d1bebe7ad5602610eacfdd8d5003f67a99726d831f23488e2ed256e806e1"


def test_dirichlet_respects_min_size_and_rejects_impossible() -> None:
    parts = partition_dirichlet(LABELS, 20, alpha=0.1, seed=0, min_size=50)
    assert min(p.size for p in parts) >= 50
    _assert_exact_cover(parts, LABELS.size)
    with pytest.raises(DataError, match="min_samples_per_client"):
        partition_dirichlet(LABELS, 20, alpha=0.1, seed=0, min_size=200)
    with pytest.raises(DataError, match="partition_alpha"):
        partition_dirichlet(LABELS, 4, alpha=0.0, seed=0)


def test_dirichlet_low_alpha_is_skewed_against_iid() -> None:
    k = 10
    iid = partition_iid(LABELS.size, k, seed=0)
    skew = partition_dirichlet(LABELS, k, alpha=0.1, seed=0, min_size=10)
    mild = partition_dirichlet(LABELS, k, alpha=0.5, seed=0, min_size=10)
    h_iid, h_skew, h_mild = (float(np.mean([label_entropy(LABELS[p], 10) for p in parts]))
                             for parts in (iid, skew, mild))
    print(f"\nmean per-client label entropy (bits, max {np.log2(10):.2f}): iid={h_iid:.3f} "
          f"dirichlet(0.5)={h_mild:.3f} dirichlet(0.1)={h_skew:.3f}")
    assert h_skew < 0.6 * h_iid
    assert h_skew < h_mild < h_iid


def test_shards_give_each_client_exactly_k_classes() -> None:
    parts = partition_shards(LABELS, 7, shards_per_client=3, seed=5)
    _assert_exact_cover(parts, LABELS.size)
    assert [np.unique(LABELS[p]).size for p in parts] == [3] * 7
    with pytest.raises(DataError, match="unassigned"):
        partition_shards(LABELS, 3, shards_per_client=2, seed=0)
    with pytest.raises(DataError, match="shards_per_client"):
        partition_shards(LABELS, 3, shards_per_client=11, seed=0)


def test_iid_sizes_are_balanced_and_min_size_checked() -> None:
    parts = partition_iid(103, 4, seed=0)
    assert sorted(p.size for p in parts) == [25, 26, 26, 26]
    with pytest.raises(DataError, match="min_samples_per_client"):
        partition_iid(30, 4, seed=0, min_size=10)


def test_labels_outside_range_are_rejected() -> None:
    with pytest.raises(DataError, match="label 10 at position 2"):
        partition_dirichlet(np.array([0, 1, 10, 2]), 2, 0.5, seed=0, min_size=1, num_classes=10)
    with pytest.raises(DataError, match="label -1"):
        partition_shards(np.array([0, 1, -1, 2]), 2, 2, seed=0)


def test_client_indices_split_the_client_part_and_cap_the_pool() -> None:
    args = DataArgs(
        partition_method="dirichlet", partition_alpha=0.5, test_fraction=0.25, max_train_samples=2000
    )
    parts = partition_pool(LABELS, args, 4, seed=1)
    assert sum(p.size for p in parts) == 2000
    seen = []
    for c in range(4):
        train, test = client_indices(LABELS, args, 4, seed=1, client_index=c)
        assert np.intersect1d(train, test).size == 0
        assert np.array_equal(np.sort(np.concatenate([train, test])), parts[c])
        assert test.size == int(parts[c].size * 0.25)
        seen.append(np.concatenate([train, test]))
    assert np.unique(np.concatenate(seen)).size == 2000
    with pytest.raises(DataError, match="client_index 4"):
        client_indices(LABELS, args, 4, seed=1, client_index=4)
