"""Client and server loaders: shapes, normalisation, determinism, caching, held-out set, stats, transform."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from fedpeft_edge.config import DataArgs
from fedpeft_edge.data import (
    ImageTransform,
    build_client_data,
    build_local_data,
    build_server_test_loader,
    load_source,
    partition_source,
)
from fedpeft_edge.data.datasets import Split, hold_out
from fedpeft_edge.data.loader import FileImages, TensorImages
from fedpeft_edge.errors import DataError

SPEC = SimpleNamespace(
    input_size=(3, 32, 32), mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3), interpolation="bicubic"
)


@pytest.fixture(scope="module")
def digits():  # type: ignore[no-untyped-def]
    torch.set_num_threads(1)
    return load_source(DataArgs())


def _first_batch(loader: torch.utils.data.DataLoader) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[type-arg]
    x, y = next(iter(loader))
    return x, y


def test_client_batches_have_backbone_shape_and_normalisation(digits) -> None:  # type: ignore[no-untyped-def]
    args = DataArgs(batch_size=16, partition_method="dirichlet", partition_alpha=0.5)
    cd = build_client_data(args, SPEC, 3, seed=0, client_index=2, source=digits)
    x, y = _first_batch(cd.train_loader)
    assert x.shape == (16, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    # digits are grayscale: the three channels are one image normalised with three means/stds
    gray = x[:, 0] * 0.2 + 0.5
    assert torch.allclose(x[:, 1] * 0.25 + 0.4, gray, atol=1e-5)
    assert float(gray.min()) >= -1e-5 and float(gray.max()) <= 1 + 1e-5
    stats = cd.stats()
    assert json.loads(json.dumps(stats)) == stats
    assert stats["num_train"] == len(cd.train_loader.dataset)  # type: ignore[arg-type]
    assert sum(stats["label_hist"]) == stats["num_train"] and len(stats["label_hist"]) == 10
    assert stats["num_test"] == len(cd.test_loader.dataset) > 0  # type: ignore[arg-type]


def test_a_partition_computed_once_gives_every_client_what_its_own_would(digits) -> None:  # type: ignore[no-untyped-def]
    args = DataArgs(batch_size=8, partition_method="dirichlet", partition_alpha=0.3)
    shared = partition_source(digits, args, 5, seed=3)
    for i in range(5):
        own = build_client_data(args, SPEC, 5, seed=3, client_index=i, source=digits)
        reused = build_client_data(args, SPEC, 5, seed=3, client_index=i, source=digits, partition=shared)
        assert own.partition_digest == reused.partition_digest == shared.digest
        assert np.array_equal(own.train_labels, reused.train_labels)
        assert np.array_equal(own.test_labels, reused.test_labels)
    with pytest.raises(DataError, match="num_clients=4"):
        build_client_data(args, SPEC, 4, seed=3, client_index=0, source=digits, partition=shared)


def test_loaders_are_deterministic_for_a_seed(digits) -> None:  # type: ignore[no-untyped-def]
    args = DataArgs(batch_size=8)
    a = build_client_data(args, SPEC, 2, seed=4, client_index=0, source=digits)
    b = build_client_data(args, SPEC, 2, seed=4, client_index=0, source=digits)
    c = build_client_data(args, SPEC, 2, seed=5, client_index=0, source=digits)
    ya, yb, yc = (torch.cat([y for _, y in cd.train_loader]) for cd in (a, b, c))
    assert torch.equal(ya, yb)
    assert not torch.equal(ya, yc)
    assert a.partition_digest == b.partition_digest != c.partition_digest
    # a second epoch shuffles differently but reproducibly
    assert not torch.equal(torch.cat([y for _, y in a.train_loader]), ya)


def test_cache_and_per_batch_paths_agree(digits) -> None:  # type: ignore[no-untyped-def]
    cached = build_client_data(DataArgs(batch_size=64), SPEC, 2, 0, 1, source=digits)
    per_batch = build_client_data(DataArgs(batch_size=64, cache_max_mb=0), SPEC, 2, 0, 1, source=digits)
    cached_set, per_batch_set = cached.train_loader.dataset, per_batch.train_loader.dataset
    assert isinstance(cached_set, TensorImages) and cached_set.cached
    assert isinstance(per_batch_set, TensorImages) and not per_batch_set.cached
    assert per_batch_set.__getitems__([]) == []  # opacus' Poisson sampling may ask for an empty batch
    xa, ya = _first_batch(cached.train_loader)
    xb, yb = _first_batch(per_batch.train_loader)
    assert torch.equal(ya, yb)
    assert torch.allclose(xa, xb)


def test_workers_give_the_same_batches(digits) -> None:  # type: ignore[no-untyped-def]
    zero = build_client_data(DataArgs(batch_size=32), SPEC, 4, 0, 3, source=digits)
    one = build_client_data(DataArgs(batch_size=32, num_workers=1), SPEC, 4, 0, 3, source=digits)
    labels_zero, labels_one = (torch.cat([y for _, y in cd.train_loader]) for cd in (zero, one))
    assert torch.equal(labels_zero, labels_one)


def test_server_test_set_is_the_held_out_split(digits) -> None:  # type: ignore[no-untyped-def]
    loader = build_server_test_loader(DataArgs(max_test_samples=100), SPEC, seed=0, source=digits)
    assert len(loader.dataset) == 100  # type: ignore[arg-type]
    full = build_server_test_loader(DataArgs(), SPEC, seed=0, source=digits)
    assert len(full.dataset) == len(digits.test)  # type: ignore[arg-type]
    pool, test = hold_out(Split(labels=np.arange(1797)))  # positions stand in for samples
    assert np.intersect1d(pool.labels, test.labels).size == 0
    assert pool.labels.size + test.labels.size == 1797


def test_client_index_out_of_range(digits) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(DataError, match="client_index 3"):
        build_client_data(DataArgs(), SPEC, 3, 0, 3, source=digits)


def test_transform_expands_gray_drops_alpha_and_resizes() -> None:
    t = ImageTransform.from_spec(SPEC, image_size=12)
    assert t.size == (12, 12) and t.interpolation == "bicubic"
    gray = torch.full((2, 1, 28, 28), 255, dtype=torch.uint8)
    out = t(gray)
    assert out.shape == (2, 3, 12, 12)
    assert torch.allclose(out[0, :, 0, 0], torch.tensor([2.5, 2.4, 7 / 3]), atol=1e-5)
    rgba = torch.zeros((1, 4, 12, 12), dtype=torch.uint8)
    assert t(rgba).shape == (1, 3, 12, 12)
    with pytest.raises(DataError, match="C in 1, 3, 4"):
        t(torch.zeros((1, 2, 5, 5), dtype=torch.uint8))
    with pytest.raises(DataError, match="input_size"):
        ImageTransform.from_spec(SimpleNamespace(input_size=(64, 64), mean=(0,), std=(1,), interpolation="x"))


def test_local_device_directory(tmp_path: Path) -> None:
    for c in ("left", "right"):
        (tmp_path / c).mkdir()
        for j in range(10):
            Image.new("RGB", (40, 30), color=(j * 20, 0, 0)).save(tmp_path / c / f"{j}.jpg")
    args = DataArgs(dataset="imagefolder", data_cache_dir=str(tmp_path), test_fraction=0.25, batch_size=4)
    local = build_local_data(args, SPEC, seed=0)
    stats = local.stats()
    assert (stats["num_train"], stats["num_test"]) == (15, 5)
    assert sum(stats["label_hist"]) + sum(stats["test_label_hist"]) == 20
    x, _ = _first_batch(local.train_loader)
    assert x.shape == (4, 3, 32, 32)
    lazy_args = DataArgs(dataset="imagefolder", data_cache_dir=str(tmp_path), cache_max_mb=0)
    lazy = build_local_data(lazy_args, SPEC, 0)
    assert isinstance(lazy.train_loader.dataset, FileImages)
    assert _first_batch(lazy.train_loader)[0].shape[1:] == (3, 32, 32)
