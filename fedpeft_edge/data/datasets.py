"""Data sources read offline into a `Source`: digits, Fashion-MNIST IDX, CIFAR-10/100 pickles, ImageFolder.

API
- `load_source(data_args, hold_out_test=True) -> Source`; `Source(name, train, test, num_classes, class_names,
  location)`; `train`/`test` are `Split`s: `labels` (int64, in [0, num_classes)) and either `images` (uint8
  N,H,W or N,H,W,C, preloaded) or `files` (an ImageFolder's paths, decoded on demand by `load_uint8`).
- `data_args.dataset`:
  - `digits`: scikit-learn's built-in 8x8 digits (1,797 images), scaled 0..16 -> 0..255. No official split.
  - `fashion_mnist`: the four IDX files (gzip or plain) in `data_cache_dir`, default
    /usr/share/datasets/fashion-mnist (Debian package dataset-fashion-mnist): 60,000 / 10,000 x 28 x 28.
  - `cifar10` / `cifar100`: the standard python-pickle directory the user points at (the only pickle read;
    restricted unpickler, see `cifar.py`).
  - `imagefolder`: `data_cache_dir/<class>/...` or `data_cache_dir/{train,test|val}/<class>/...`; how users
    bring Resisc45, PCam exported as images, their own data, and how a device reads its own local directory.
  - `fortunes`, `textfolder`, `jsonl`: text labelled by category, for text backbones (fedpeft_edge/data/text.py).
- Sources without an official test split (digits, a flat ImageFolder) get a fixed held-out set: 20% chosen
  with seed `HELD_OUT_SEED`, the same in every run and process, split off BEFORE any partitioning so clients
  never see it. `hold_out_test=False` keeps everything in `train` (a device reading its own directory).
Nothing is ever downloaded.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from fedpeft_edge.config import DataArgs
from fedpeft_edge.data.cifar import load_cifar_arrays
from fedpeft_edge.data.idx import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, load_fashion_arrays
from fedpeft_edge.data.imagefolder import decode_images, list_image_folder
from fedpeft_edge.data.partition import make_rng, permutation
from fedpeft_edge.data.text import Docs, read_text_source
from fedpeft_edge.errors import DataError

logger = logging.getLogger(__name__)

HELD_OUT_FRACTION = 0.2
HELD_OUT_SEED = 20240604  # fixed on purpose: the global test set must not move with the run seed
_PURPOSE_HELD_OUT = 5


@dataclasses.dataclass(frozen=True)
class Split:
    """Labels plus either preloaded uint8 images or image files decoded on demand."""

    labels: np.ndarray
    images: np.ndarray | None = None  # uint8 (N, H, W) or (N, H, W, C)
    files: tuple[Path, ...] | None = None
    texts: tuple[str, ...] | None = None  # a text source's documents (fedpeft_edge/data/text.py)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, indices: np.ndarray) -> Split:
        """The samples at `indices`, in that order."""
        idx = np.asarray(indices, dtype=np.int64)
        images = None if self.images is None else self.images[idx]
        files = None if self.files is None else tuple(self.files[i] for i in idx)
        texts = None if self.texts is None else tuple(self.texts[i] for i in idx)
        return Split(labels=self.labels[idx], images=images, files=files, texts=texts)

    def load_uint8(self, size: tuple[int, int], interpolation: str = "bilinear") -> torch.Tensor:
        """All images as uint8 (N, C, H, W); files are decoded at `size`, arrays kept as they are."""
        if self.images is not None:
            arr = self.images if self.images.ndim == 4 else self.images[..., None]
            return torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).contiguous()
        if self.files is not None:
            decoded = decode_images(self.files, size, interpolation)
            return torch.from_numpy(decoded).permute(0, 3, 1, 2).contiguous()
        return torch.zeros((len(self), 3, size[0], size[1]), dtype=torch.uint8)


@dataclasses.dataclass(frozen=True)
class Source:
    """A whole data set: a training pool (partitioned across clients) and the server's held-out test split."""

    name: str
    train: Split
    test: Split
    num_classes: int
    class_names: tuple[str, ...]
    location: str  # the directory read, or "sklearn"


_Loaded = tuple[Split, Split | None, tuple[str, ...], str]


def _data_dir(data_args: DataArgs, default: str | None) -> Path:
    if data_args.data_cache_dir:
        return Path(data_args.data_cache_dir).expanduser()
    if default is None:
        raise DataError(
            f"data_args.dataset={data_args.dataset!r} needs data_args.data_cache_dir: the local directory "
            "holding the data set (nothing is downloaded)"
        )
    return Path(default)


def _load_digits(data_args: DataArgs) -> _Loaded:
    try:
        from sklearn.datasets import load_digits  # the only data source that needs scikit-learn
    except ImportError as exc:
        raise DataError(
            "data_args.dataset='digits' is scikit-learn's digits set, which an agent-only install lacks; "
            "pip install 'fedpeft-edge[server]' or train on the device's own data (--dataset imagefolder)"
        ) from exc

    bunch = load_digits()
    images = np.rint(np.asarray(bunch.images) * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    names = tuple(str(n) for n in bunch.target_names)
    return Split(np.asarray(bunch.target, dtype=np.int64), images=images), None, names, "sklearn"


def _load_fashion(data_args: DataArgs) -> _Loaded:
    directory = _data_dir(data_args, FASHION_MNIST_DIR)
    a = load_fashion_arrays(directory)
    train = Split(a["train_labels"].astype(np.int64), images=a["train_images"])
    test = Split(a["test_labels"].astype(np.int64), images=a["test_images"])
    return train, test, FASHION_MNIST_CLASSES, str(directory)


def _load_cifar(data_args: DataArgs) -> _Loaded:
    arrays, names, directory = load_cifar_arrays(_data_dir(data_args, None), data_args.dataset)
    train = Split(arrays["train_labels"], images=arrays["train_images"])
    test = Split(arrays["test_labels"], images=arrays["test_images"])
    return train, test, names, str(directory)


def _load_image_folder(data_args: DataArgs) -> _Loaded:
    root = _data_dir(data_args, None)
    fixed = data_args.class_names  # the run's label order, when the config gives it
    if (root / "train").is_dir():
        files, labels, names = list_image_folder(root / "train", fixed)
        test_root = next((root / n for n in ("test", "val") if (root / n).is_dir()), None)
        test = None
        if test_root is not None:
            test_files, test_labels, _ = list_image_folder(test_root, names)
            test = Split(test_labels, files=tuple(test_files))
        return Split(labels, files=tuple(files)), test, names, str(root)
    files, labels, names = list_image_folder(root, fixed)
    return Split(labels, files=tuple(files)), None, names, str(root)


def _load_text(data_args: DataArgs) -> _Loaded:
    """Text sources (data/text.py): documents labelled by category, category names sorted."""
    docs, test_docs, names, location = read_text_source(data_args)
    index = {n: i for i, n in enumerate(names)}

    def split(items: Docs) -> Split:
        kept = [(c, t) for c, t in items if c in index]
        return Split(labels=np.asarray([index[c] for c, _ in kept], dtype=np.int64),
                     texts=tuple(t for _, t in kept))

    return split(docs), (split(test_docs) if test_docs else None), names, location


_LOADERS: dict[str, Callable[[DataArgs], _Loaded]] = {
    "digits": _load_digits,
    "fashion_mnist": _load_fashion,
    "cifar10": _load_cifar,
    "cifar100": _load_cifar,
    "imagefolder": _load_image_folder,
    "fortunes": _load_text,
    "textfolder": _load_text,
    "jsonl": _load_text,
}


def _check_labels(split: Split, num_classes: int, where: str) -> None:
    bad = np.flatnonzero((split.labels < 0) | (split.labels >= num_classes))
    if bad.size:
        i = int(bad[0])
        item = f" ({split.files[i]})" if split.files is not None else ""
        raise DataError(
            f"{where}: label {int(split.labels[i])} of sample {i}{item} is outside [0, {num_classes}); "
            "the files are corrupt or belong to another data set"
        )


def hold_out(
    split: Split, fraction: float = HELD_OUT_FRACTION, seed: int = HELD_OUT_SEED
) -> tuple[Split, Split]:
    """(pool, held-out test): a fixed seeded `fraction` of `split` set aside before any partitioning."""
    order = permutation(make_rng(seed, _PURPOSE_HELD_OUT), len(split))
    n_test = int(round(len(split) * fraction))
    return split.subset(np.sort(order[n_test:])), split.subset(np.sort(order[:n_test]))


def load_source(data_args: DataArgs, hold_out_test: bool = True) -> Source:
    """Read `data_args.dataset` from local files; see the module docstring for layouts and defaults."""
    loader = _LOADERS.get(data_args.dataset)
    if loader is None:
        raise DataError(f"unknown data_args.dataset {data_args.dataset!r}; use one of {sorted(_LOADERS)}")
    train, test, names, location = loader(data_args)
    for split, which in ((train, "train"), (test, "test")):
        if split is not None:
            _check_labels(split, len(names), f"{data_args.dataset} {which} split in {location}")
    if test is None:
        train, test = hold_out(train) if hold_out_test else (train, train.subset(np.zeros(0, dtype=np.int64)))
    logger.info("loaded %s from %s: %d train, %d test, %d classes", data_args.dataset, location, len(train),
                len(test), len(names))
    return Source(data_args.dataset, train, test, len(names), names, location)
