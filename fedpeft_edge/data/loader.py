"""Each device's own data as deterministic DataLoaders, and the server's held-out test loader.

API
- `build_client_data(data_args, input_spec, num_clients, seed, client_index, source=None, partition=None)
  -> ClientData`: this client's part of the partition (`partition.client_indices`), its local train/test
  split, loaders; `partition_source(src, data_args, num_clients, seed) -> PoolPartition` computes the
  partition once for many clients.
- `build_local_data(data_args, input_spec, seed, source=None) -> ClientData`: deployment on a device that
  holds its own data (`dataset: imagefolder`, `data_cache_dir` = the device's directory); no partitioning;
  its `test` sub-tree is the local test set, else a seeded `test_fraction` of it.
- `build_server_test_loader(data_args, input_spec, seed, source=None) -> DataLoader`: the source's test split
  (official, or the fixed held-out 20%), capped at `max_test_samples` by a seeded subset, not shuffled.
- `ClientData(train_loader, test_loader, num_classes, class_names, train_labels, test_labels, client_index,
  partition_digest)` with `stats() -> dict` (JSON-able: num_train, num_test, label_hist, test_label_hist,
  num_classes, partition_digest); `test_loader` yields nothing when the client has no test samples.
Pass `source` (from `load_source`) to build many clients in one process without re-reading the files.

Batches are `(float32 images (B, 3, H, W) normalised for the backbone, int64 labels (B,))`. Images are held
as uint8 and resized/normalised in whole batches; when a client's float tensor fits in
`data_args.cache_max_mb` it is computed once and kept. Loaders shuffle with a `torch.Generator` seeded from
(seed, client_index), so a seed gives the same batches on every run; `num_workers` comes from data_args.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from fedpeft_edge.config import DataArgs
from fedpeft_edge.data.datasets import Source, Split, load_source
from fedpeft_edge.data.imagefolder import decode_images
from fedpeft_edge.data.partition import (
    check_client_index,
    partition_digest,
    partition_pool,
    split_train_test,
    subset_pool,
)
from fedpeft_edge.data.stats import data_stats
from fedpeft_edge.data.transform import ImageTransform, InputSpecLike
from fedpeft_edge.errors import DataError

logger = logging.getLogger(__name__)

_PURPOSE_SERVER_TEST = 4
_PURPOSE_LOADER = 6
_CHUNK = 128  # images transformed at once when filling the cache

Sample = tuple[torch.Tensor, torch.Tensor]


class TensorImages(Dataset[Sample]):
    """Preloaded uint8 images; transformed per batch, or once into a float cache when `cache` is set."""

    def __init__(
        self, images: torch.Tensor, labels: torch.Tensor, transform: ImageTransform, cache: bool
    ) -> None:
        self.labels = labels
        self.transform = transform
        self.cached = cache and len(images) > 0
        # either the uint8 images or, when cached, their transformed float32 copy (the uint8 are dropped)
        self._data = (
            torch.cat([transform(images[i : i + _CHUNK]) for i in range(0, len(images), _CHUNK)])
            if self.cached else images
        )

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes this data set holds in memory (images or their float cache, and labels)."""
        return int(self._data.numel() * self._data.element_size() + self.labels.numel() * 8)

    def _batch(self, idx: torch.Tensor) -> torch.Tensor:
        return self._data[idx] if self.cached else self.transform(self._data[idx])

    def __getitem__(self, i: int) -> Sample:
        return self._batch(torch.tensor([i]))[0], self.labels[i]

    def __getitems__(self, indices: list[int]) -> list[Sample]:
        if not indices:  # opacus' Poisson sampling can draw an empty batch
            return []
        idx = torch.as_tensor(indices, dtype=torch.long)
        return list(zip(self._batch(idx).unbind(0), self.labels[idx].unbind(0), strict=True))


class FileImages(Dataset[Sample]):
    """ImageFolder files decoded per batch (a tree too big to preload)."""

    def __init__(self, split: Split, transform: ImageTransform) -> None:
        self.files = split.files or ()
        self.labels = torch.from_numpy(split.labels)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    @property
    def nbytes(self) -> int:
        """Bytes this data set holds in memory (the labels; images stay on disk)."""
        return int(self.labels.numel() * self.labels.element_size())

    def __getitem__(self, i: int) -> Sample:
        return self.__getitems__([i])[0]

    def __getitems__(self, indices: list[int]) -> list[Sample]:
        if not indices:
            return []
        files = [self.files[i] for i in indices]
        raw = decode_images(files, self.transform.size, self.transform.interpolation)
        x = self.transform(torch.from_numpy(raw).permute(0, 3, 1, 2))
        return list(zip(x.unbind(0), self.labels[indices].unbind(0), strict=True))


def make_dataset(split: Split, transform: ImageTransform, cache_max_mb: int) -> Dataset[Sample]:
    """The dataset for one split: cached floats if they fit, else uint8 per batch, else files per batch."""
    h, w = transform.size
    budget = cache_max_mb * 2**20
    if split.images is None and split.files is not None and len(split) * 3 * h * w > budget:
        logger.info("%d image files exceed cache_max_mb=%d: decoding per batch", len(split), cache_max_mb)
        return FileImages(split, transform)
    images = split.load_uint8(transform.size, transform.interpolation)
    cache = len(split) * 3 * h * w * 4 <= budget
    return TensorImages(images, torch.from_numpy(np.asarray(split.labels, dtype=np.int64)), transform, cache)


def loader_seed(seed: int, client_index: int) -> int:
    """The torch seed of a client's shuffling (stable across machines)."""
    state = np.random.SeedSequence([seed, _PURPOSE_LOADER, client_index]).generate_state(1, np.uint64)
    return int(state[0] & 0x7FFF_FFFF_FFFF_FFFF)


def make_loader(
    dataset: Dataset[Sample], data_args: DataArgs, shuffle: bool, seed: int
) -> DataLoader[Sample]:
    """A DataLoader with the batch size, worker count and a seeded generator from data_args."""
    if data_args.num_workers < 0:
        raise DataError(f"data_args.num_workers must be >= 0, got {data_args.num_workers}")
    return DataLoader(
        dataset,
        batch_size=data_args.batch_size,
        shuffle=shuffle,
        num_workers=data_args.num_workers,
        persistent_workers=data_args.num_workers > 0,
        generator=torch.Generator().manual_seed(seed),
    )


@dataclasses.dataclass(frozen=True)
class ClientData:
    """One device's loaders and the facts about its data that go into the join message."""

    train_loader: DataLoader[Sample]
    test_loader: DataLoader[Sample]
    num_classes: int
    class_names: tuple[str, ...]
    train_labels: np.ndarray
    test_labels: np.ndarray
    client_index: int | None
    partition_digest: str | None  # SHA-256 of the whole partition: equal on every device of a run

    def stats(self) -> dict[str, Any]:
        """JSON-able num_train, num_test, label_hist, test_label_hist, num_classes, partition_digest."""
        out = data_stats(self.train_labels, self.test_labels, self.num_classes)
        out["partition_digest"] = self.partition_digest
        return out


def align_labels(data: ClientData, run_classes: Sequence[str]) -> ClientData:
    """`data` relabelled to the run's label order: each of its classes maps to the run's class of that name (a
    device holding a subset of the classes numbers its folders from 0 by itself). The loaders' datasets are
    relabelled in place, so a loader already built (or wrapped, by DP) sees the run's labels."""
    run = tuple(run_classes)
    if tuple(data.class_names) == run:
        return data
    index = {name: i for i, name in enumerate(run)}
    missing = [n for n in data.class_names if n not in index]
    if missing:
        raise DataError(f"this device's classes {missing[:10]} are not among the run's classes {list(run)[:10]}: "
                        "rename the class folders to the run's names, or add the classes to the server's "
                        "data_args.class_names (and model_args.num_classes)")
    mapping = np.asarray([index[n] for n in data.class_names], dtype=np.int64)
    table = torch.from_numpy(mapping)
    for loader in (data.train_loader, data.test_loader):
        dataset = loader.dataset
        labels = getattr(dataset, "labels", None)
        if isinstance(labels, torch.Tensor):
            dataset.labels = table[labels]  # type: ignore[attr-defined]
    logger.info("labels mapped to the run's %d classes by name: %s", len(run),
                {n: int(i) for n, i in zip(data.class_names, mapping, strict=True)})
    return dataclasses.replace(data, train_labels=mapping[data.train_labels], test_labels=mapping[data.test_labels],
                               num_classes=len(run), class_names=run)


def _client_data(
    source: Source, train: Split, test: Split, data_args: DataArgs, input_spec: InputSpecLike, seed: int,
    client_index: int | None, digest: str | None,
) -> ClientData:
    shuffle_seed = loader_seed(seed, client_index if client_index is not None else 0)
    train_set = _dataset_for(train, input_spec, data_args, True)
    test_set = _dataset_for(test, input_spec, data_args, False)
    return ClientData(
        train_loader=make_loader(train_set, data_args, True, shuffle_seed),
        test_loader=make_loader(test_set, data_args, False, 0),
        num_classes=source.num_classes,
        class_names=source.class_names,
        train_labels=train.labels,
        test_labels=test.labels,
        client_index=client_index,
        partition_digest=digest,
    )


@dataclasses.dataclass(frozen=True)
class PoolPartition:
    """Every client's part of a source's training pool and its digest, computed once for all the clients one
    process builds (a fleet of K would otherwise partition the whole pool K times)."""

    num_clients: int
    parts: tuple[np.ndarray, ...]
    digest: str


def partition_source(src: Source, data_args: DataArgs, num_clients: int, seed: int) -> PoolPartition:
    """The partition of `src`'s training pool across `num_clients` (`partition.partition_pool`)."""
    parts = tuple(partition_pool(src.train.labels, data_args, num_clients, seed, src.num_classes))
    return PoolPartition(num_clients, parts, partition_digest(parts))


def build_client_data(
    data_args: DataArgs, input_spec: InputSpecLike, num_clients: int, seed: int, client_index: int,
    source: Source | None = None, partition: PoolPartition | None = None,
) -> ClientData:
    """Client `client_index` of `num_clients`: its partition part, local train/test split, and loaders.
    `partition` (of `source`, from `partition_source`) spares computing it again for every client."""
    check_client_index(client_index, num_clients)
    src = source if source is not None else load_source(data_args)
    if partition is None:
        partition = partition_source(src, data_args, num_clients, seed)
    elif partition.num_clients != num_clients:
        raise DataError(f"a partition across {partition.num_clients} clients was given for client {client_index} "
                        f"of {num_clients}; partition the source with num_clients={num_clients}")
    train_idx, test_idx = split_train_test(partition.parts[client_index], data_args.test_fraction, seed,
                                           client_index)
    logger.info("client %d/%d: %d train, %d test", client_index, num_clients, len(train_idx), len(test_idx))
    train, test = src.train.subset(train_idx), src.train.subset(test_idx)
    return _client_data(src, train, test, data_args, input_spec, seed, client_index, partition.digest)


def build_local_data(
    data_args: DataArgs, input_spec: InputSpecLike, seed: int, source: Source | None = None
) -> ClientData:
    """A device's own data set, not partitioned: its test split, or a seeded `test_fraction` of it."""
    src = source if source is not None else load_source(data_args, hold_out_test=False)
    pool = src.train.subset(subset_pool(len(src.train), data_args.max_train_samples, seed))
    if len(src.test):
        train, test = pool, src.test
    else:
        train_idx, test_idx = split_train_test(np.arange(len(pool)), data_args.test_fraction, seed, 0)
        train, test = pool.subset(train_idx), pool.subset(test_idx)
    return _client_data(src, train, test, data_args, input_spec, seed, None, None)


def build_server_test_loader(
    data_args: DataArgs, input_spec: InputSpecLike, seed: int, source: Source | None = None
) -> DataLoader[Sample]:
    """The server's held-out test set (never given to clients), capped at max_test_samples, in fixed order."""
    src = source if source is not None else load_source(data_args)
    test = src.test.subset(subset_pool(len(src.test), data_args.max_test_samples, seed, _PURPOSE_SERVER_TEST))
    if not len(test):
        raise DataError(f"{src.name} in {src.location} has no test samples for the server; add a test split")
    return make_loader(_dataset_for(test, input_spec, data_args, False), data_args, False, 0)


def _dataset_for(split: Split, input_spec: Any, data_args: DataArgs, train: bool) -> Dataset[Sample]:
    """Images through the backbone's transform, or text tokenised for a text backbone (its `TextSpec`)."""
    if getattr(input_spec, "tokenizer", None) is not None:
        from fedpeft_edge.llm.data import text_dataset

        return text_dataset(split, input_spec, data_args, train)
    if split.texts is not None:
        raise DataError(f"data_args.dataset={data_args.dataset!r} holds text, but the backbone takes images; set "
                        "model_args.family to causal_lm or text_classifier")
    transform = ImageTransform.from_spec(input_spec, data_args.image_size)
    return make_dataset(split, transform, data_args.cache_max_mb)
