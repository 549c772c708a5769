"""IDX files (MNIST, Fashion-MNIST), gzip or plain: a checked reader and the Fashion-MNIST directory loader.

`read_idx(path) -> np.ndarray` reads one unsigned-byte IDX file (magic 0x0000080N), checking its header and
that the payload has exactly the size the header claims. `find_idx_file(directory, stem)` accepts
`<stem>`, `<stem>.gz` and the common `train-images.idx3-ubyte` spelling.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from fedpeft_edge.errors import DataError

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # Debian package dataset-fashion-mnist
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
_UBYTE = 0x08


def find_idx_file(directory: Path, stem: str) -> Path:
    """The file for `stem` (e.g. "train-images-idx3-ubyte") in `directory`, plain or gzip."""
    dotted = stem.replace("-idx", ".idx")
    for name in (stem, stem + ".gz", dotted, dotted + ".gz"):
        if (directory / name).is_file():
            return directory / name
    present = sorted(p.name for p in directory.iterdir())[:10] if directory.is_dir() else []
    raise DataError(
        f"no IDX file {stem}[.gz] in {directory} (found: {present or 'nothing'}); point "
        "data_args.data_cache_dir at a directory with the four Fashion-MNIST IDX files "
        "(apt install dataset-fashion-mnist)"
    )


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(
            f"cannot read IDX file {path}: {exc}; the file is truncated or corrupt, restore it"
        ) from exc


def read_idx(path: str | Path) -> np.ndarray:
    """One unsigned-byte IDX file as a uint8 array of the shape its header gives."""
    p = Path(path)
    data = _read_bytes(p)
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DataError(f"{p} is not an IDX file (bad magic {data[:4]!r}); check data_args.data_cache_dir")
    if data[2] != _UBYTE:
        raise DataError(f"{p}: IDX element type 0x{data[2]:02x} is not supported, only unsigned bytes (0x08)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"IDX file {p} is truncated inside its header ({len(data)} bytes); restore the file")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape, dtype=np.int64))
    if len(data) != expected:
        raise DataError(
            f"IDX file {p} is truncated or padded: header says shape {shape} ({expected} bytes), file holds "
            f"{len(data)} bytes; restore the file"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def load_fashion_arrays(directory: Path) -> dict[str, np.ndarray]:
    """The four Fashion-MNIST arrays keyed train_images, train_labels, test_images, test_labels."""
    if not directory.is_dir():
        raise DataError(
            f"Fashion-MNIST directory {directory} does not exist; install dataset-fashion-mnist or set "
            "data_args.data_cache_dir to a directory with the IDX files"
        )
    stems = {
        "train_images": "train-images-idx3-ubyte",
        "train_labels": "train-labels-idx1-ubyte",
        "test_images": "t10k-images-idx3-ubyte",
        "test_labels": "t10k-labels-idx1-ubyte",
    }
    out = {key: read_idx(find_idx_file(directory, stem)) for key, stem in stems.items()}
    for split in ("train", "test"):
        images, labels = out[f"{split}_images"], out[f"{split}_labels"]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(
                f"Fashion-MNIST {split} files in {directory} disagree: images {images.shape}, labels "
                f"{labels.shape}; restore the files"
            )
    return out
