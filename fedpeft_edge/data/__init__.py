"""Offline data sets, the paper's partitions and each device's own loaders (see the submodules' docstrings).

`load_source` (datasets.py) reads a data set; `client_indices` / `partition_pool` (partition.py) split its
training pool; `build_client_data`, `build_local_data`, `build_server_test_loader` (loader.py) give loaders
(`partition_source` partitions a pool once for the many clients of one process);
`data_stats` (stats.py) the JSON-able statistics for join messages and reports.
"""

from fedpeft_edge.data.datasets import HELD_OUT_FRACTION, HELD_OUT_SEED, Source, Split, load_source
from fedpeft_edge.data.loader import (
    ClientData,
    PoolPartition,
    align_labels,
    build_client_data,
    build_local_data,
    build_server_test_loader,
    partition_source,
)
from fedpeft_edge.data.partition import (
    client_indices,
    partition_digest,
    partition_dirichlet,
    partition_iid,
    partition_labels,
    partition_pool,
    partition_shards,
    split_train_test,
)
from fedpeft_edge.data.stats import data_stats, label_entropy, label_histogram
from fedpeft_edge.data.transform import ImageTransform, InputSpecLike

__all__ = [
    "HELD_OUT_FRACTION",
    "HELD_OUT_SEED",
    "ClientData",
    "ImageTransform",
    "InputSpecLike",
    "PoolPartition",
    "align_labels",
    "Source",
    "Split",
    "build_client_data",
    "build_local_data",
    "build_server_test_loader",
    "client_indices",
    "data_stats",
    "label_entropy",
    "label_histogram",
    "load_source",
    "partition_digest",
    "partition_dirichlet",
    "partition_iid",
    "partition_labels",
    "partition_pool",
    "partition_source",
    "partition_shards",
    "split_train_test",
]
