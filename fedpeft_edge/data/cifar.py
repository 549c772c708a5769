"""CIFAR-10 / CIFAR-100 from their standard python-pickle directories, read with a restricted unpickler.

Security: these are the ONLY pickles fedpeft-edge reads, and only from local files the user points at with
`data_args.data_cache_dir` (never from the network). Even so, `_CifarUnpickler` resolves no global except
the three numpy names an array needs and `codecs.encode` (bytes in Python 3 protocol-2 pickles), so a
tampered file fails with a DataError instead of running code.

Layouts accepted: the extracted `cifar-10-batches-py/` (data_batch_1..5, test_batch, batches.meta) and
`cifar-100-python/` (train, test, meta) directories, or their parent directory.
"""

from __future__ import annotations

import codecs
import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from fedpeft_edge.errors import DataError

try:  # numpy >= 2
    from numpy._core.multiarray import _reconstruct
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]

_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,  # bytes in protocol-2 pickles written by Python 3
}
_LAYOUTS = {
    "cifar10": (
        "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "batches.meta"
    ),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "meta"),
}
_LABEL_KEYS = {"cifar10": ("labels", "label_names"), "cifar100": ("fine_labels", "fine_label_names")}


class _CifarUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR file") from None


def read_cifar_pickle(path: Path) -> dict[str, Any]:
    """One CIFAR pickle as a dict with str keys; any other global or a corrupt file is a DataError."""
    try:
        raw = _CifarUnpickler(io.BytesIO(path.read_bytes()), encoding="bytes").load()
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError) as exc:
        raise DataError(
            f"cannot read CIFAR file {path}: {exc}; restore the original python-pickle file"
        ) from exc
    if not isinstance(raw, dict):
        raise DataError(f"CIFAR file {path} holds a {type(raw).__name__}, expected a dict; restore the file")
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in raw.items()}


def _resolve_dir(root: Path, variant: str) -> Path:
    sub, train_files, _, _ = _LAYOUTS[variant]
    for candidate in (root, root / sub):
        if (candidate / train_files[0]).is_file():
            return candidate
    raise DataError(
        f"no {variant} python-pickle files in {root} (expected {train_files[0]} there or in {root / sub}); "
        f"set data_args.data_cache_dir to the extracted {sub} directory"
    )


def _read_batches(directory: Path, names: list[str], label_key: str) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for name in names:
        path = directory / name
        if not path.is_file():
            raise DataError(f"CIFAR file {path} is missing; restore the complete extracted directory")
        batch = read_cifar_pickle(path)
        try:
            data = np.asarray(batch["data"], dtype=np.uint8)
            lab = np.asarray(batch[label_key], dtype=np.int64)
        except KeyError as exc:
            raise DataError(f"CIFAR file {path} has no key {exc}; is it the right data set?") from exc
        if data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(lab):
            raise DataError(f"CIFAR file {path}: data {data.shape} and labels {lab.shape} do not fit 3x32x32")
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(lab)
    return np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels)


def load_cifar_arrays(root: Path, variant: str) -> tuple[dict[str, np.ndarray], tuple[str, ...], Path]:
    """(arrays keyed train_images/train_labels/test_images/test_labels, class names, resolved directory)."""
    directory = _resolve_dir(root, variant)
    _, train_files, test_files, meta_file = _LAYOUTS[variant]
    label_key, names_key = _LABEL_KEYS[variant]
    meta = read_cifar_pickle(directory / meta_file) if (directory / meta_file).is_file() else {}
    names = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in meta.get(names_key, []))
    if not names:
        names = tuple(str(i) for i in range(10 if variant == "cifar10" else 100))
    train_x, train_y = _read_batches(directory, train_files, label_key)
    test_x, test_y = _read_batches(directory, test_files, label_key)
    arrays = {"train_images": train_x, "train_labels": train_y, "test_images": test_x, "test_labels": test_y}
    return arrays, names, directory
