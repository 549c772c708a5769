"""Sources: Fashion-MNIST IDX (Debian path and a copy), CIFAR pickle dirs, ImageFolder trees, clear errors."""

from __future__ import annotations

import gzip
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedpeft_edge.config import DataArgs
from fedpeft_edge.data.cifar import read_cifar_pickle
from fedpeft_edge.data.datasets import HELD_OUT_FRACTION, load_source
from fedpeft_edge.data.idx import FASHION_MNIST_DIR, read_idx
from fedpeft_edge.errors import DataError

FASHION = Path(FASHION_MNIST_DIR)
needs_fashion = pytest.mark.skipif(not FASHION.is_dir(), reason="Debian dataset-fashion-mnist not installed")


def _write_idx(path: Path, array: np.ndarray, gz: bool = False) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)


def _fake_fashion(directory: Path, train_labels: np.ndarray, gz: bool = False) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    ext = ".gz" if gz else ""
    n = len(train_labels)
    _write_idx(directory / f"train-images-idx3-ubyte{ext}", rng.integers(0, 256, (n, 28, 28)), gz)
    _write_idx(directory / f"train-labels-idx1-ubyte{ext}", train_labels, gz)
    _write_idx(directory / f"t10k-images-idx3-ubyte{ext}", rng.integers(0, 256, (4, 28, 28)), gz)
    _write_idx(directory / f"t10k-labels-idx1-ubyte{ext}", np.array([0, 1, 2, 3]), gz)
    return directory


@needs_fashion
def test_fashion_mnist_from_debian_path_and_a_copy(tmp_path: Path) -> None:
    default = load_source(DataArgs(dataset="fashion_mnist"))
    copy = shutil.copytree(FASHION, tmp_path / "fm")
    copied = load_source(DataArgs(dataset="fashion_mnist", data_cache_dir=str(copy)))
    for src in (default, copied):
        assert src.train.images is not None and src.test.images is not None
        assert src.train.images.shape == (60000, 28, 28) and src.train.images.dtype == np.uint8
        assert src.test.images.shape == (10000, 28, 28)
        assert src.num_classes == 10 and src.class_names[9] == "Ankle boot"
        assert np.bincount(src.train.labels).tolist() == [6000] * 10
    assert np.array_equal(default.train.labels, copied.train.labels)


@needs_fashion
def test_truncated_fashion_file_names_the_path(tmp_path: Path) -> None:
    copy = Path(shutil.copytree(FASHION, tmp_path / "fm"))
    labels = copy / "train-labels-idx1-ubyte.gz"
    labels.write_bytes(labels.read_bytes()[:5000])
    with pytest.raises(DataError, match=str(labels)):
        load_source(DataArgs(dataset="fashion_mnist", data_cache_dir=str(copy)))


def test_plain_idx_truncated_or_wrong_magic(tmp_path: Path) -> None:
    path = tmp_path / "x-idx3-ubyte"
    _write_idx(path, np.zeros((3, 4, 5)))
    assert read_idx(path).shape == (3, 4, 5)
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(DataError, match=rf"{path}.*truncated"):
        read_idx(path)
    path.write_bytes(b"PK\x03\x04 not idx")
    with pytest.raises(DataError, match="not an IDX file"):
        read_idx(path)


def test_fake_fashion_plain_and_gzip_and_label_out_of_range(tmp_path: Path) -> None:
    plain = _fake_fashion(tmp_path / "plain", np.arange(20) % 10)
    gz = _fake_fashion(tmp_path / "gz", np.arange(20) % 10, gz=True)
    for d in (plain, gz):
        src = load_source(DataArgs(dataset="fashion_mnist", data_cache_dir=str(d)))
        assert len(src.train) == 20 and len(src.test) == 4
    bad = _fake_fashion(tmp_path / "bad", np.array([0, 1, 12, 3]))
    with pytest.raises(DataError, match=rf"{bad}: label 12 of sample 2 is outside \[0, 10\)"):
        load_source(DataArgs(dataset="fashion_mnist", data_cache_dir=str(bad)))


def test_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    for dataset in ("fashion_mnist", "cifar10", "imagefolder"):
        with pytest.raises(DataError, match=str(missing)):
            load_source(DataArgs(dataset=dataset, data_cache_dir=str(missing)))  # type: ignore[arg-type]
    with pytest.raises(DataError, match="data_cache_dir"):
        load_source(DataArgs(dataset="cifar10"))


def test_digits_has_a_fixed_held_out_split() -> None:
    a, b = load_source(DataArgs()), load_source(DataArgs())
    assert len(a.train) + len(a.test) == 1797
    assert len(a.test) == round(1797 * HELD_OUT_FRACTION)
    assert a.train.images is not None and a.train.images.dtype == np.uint8 and a.train.images.max() == 255
    assert np.array_equal(a.test.labels, b.test.labels)
    assert a.test.images is not None and b.test.images is not None
    assert np.array_equal(a.test.images, b.test.images)


def _pickle(path: Path, obj: object) -> None:
    path.write_bytes(pickle.dumps(obj, protocol=2))


def _fake_cifar(root: Path, variant: str, per_file: int = 6) -> Path:
    rng = np.random.default_rng(1)
    k = 10 if variant == "cifar10" else 100
    if variant == "cifar10":
        d = root / "cifar-10-batches-py"
        files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
        label_key, meta, names_key = b"labels", "batches.meta", b"label_names"
    else:
        d = root / "cifar-100-python"
        files, label_key, meta, names_key = ["train", "test"], b"fine_labels", "meta", b"fine_label_names"
    d.mkdir(parents=True)
    for name in files:
        data = rng.integers(0, 256, (per_file, 3072), dtype=np.uint8)
        _pickle(d / name, {b"data": data, label_key: [int(x) for x in rng.integers(0, k, per_file)]})
    _pickle(d / meta, {names_key: [f"class{i}".encode() for i in range(k)]})
    return d


@pytest.mark.parametrize("variant", ["cifar10", "cifar100"])
def test_fake_cifar_directory_loads(tmp_path: Path, variant: str) -> None:
    d = _fake_cifar(tmp_path, variant)
    for where in (tmp_path, d):  # the parent or the extracted directory
        src = load_source(DataArgs(dataset=variant, data_cache_dir=str(where)))  # type: ignore[arg-type]
        n_train = 30 if variant == "cifar10" else 6
        assert src.train.images is not None and src.train.images.shape == (n_train, 32, 32, 3)
        assert len(src.test) == 6 and src.num_classes == (10 if variant == "cifar10" else 100)
        assert src.class_names[1] == "class1"
    raw = read_cifar_pickle(d / ("test_batch" if variant == "cifar10" else "test"))
    first = np.asarray(raw["data"])[0]
    assert np.array_equal(src.test.images[0][..., 0].ravel(), first[:1024])  # type: ignore[index]


class _Evil:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("echo pwned > /dev/null",))


def test_cifar_pickle_with_foreign_global_is_refused(tmp_path: Path) -> None:
    d = _fake_cifar(tmp_path, "cifar10")
    _pickle(d / "data_batch_3", {b"data": _Evil(), b"labels": []})
    with pytest.raises(DataError, match=r"data_batch_3.*not allowed"):
        load_source(DataArgs(dataset="cifar10", data_cache_dir=str(d)))


def test_cifar_label_outside_class_range(tmp_path: Path) -> None:
    d = _fake_cifar(tmp_path, "cifar10")
    _pickle(d / "test_batch", {b"data": np.zeros((2, 3072), np.uint8), b"labels": [3, 10]})
    with pytest.raises(DataError, match=rf"{d}: label 10 of sample 1"):
        load_source(DataArgs(dataset="cifar10", data_cache_dir=str(d)))


def _image_tree(root: Path, classes: dict[str, int], size: tuple[int, int] = (20, 12)) -> Path:
    for i, (name, count) in enumerate(classes.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        for j in range(count):
            mode = "L" if j % 2 else "RGB"
            color = (i * 40) if mode == "L" else (i * 40, j, 7)
            Image.new(mode, size, color=color).save(root / name / f"{j}.png")
    return root


def test_image_folder_flat_and_train_test(tmp_path: Path) -> None:
    flat = _image_tree(tmp_path / "flat", {"cat": 5, "dog": 5, "owl": 5})
    (flat / "notes.txt").write_text("not an image")
    src = load_source(DataArgs(dataset="imagefolder", data_cache_dir=str(flat)))
    assert src.class_names == ("cat", "dog", "owl")
    assert len(src.train) == 12 and len(src.test) == 3 and src.train.files is not None
    img = src.train.load_uint8((16, 16))
    assert tuple(img.shape) == (12, 3, 16, 16)
    split = tmp_path / "split"
    _image_tree(split / "train", {"a": 3, "b": 2})
    _image_tree(split / "val", {"a": 1, "b": 1})
    src = load_source(DataArgs(dataset="imagefolder", data_cache_dir=str(split)))
    assert (len(src.train), len(src.test), src.num_classes) == (5, 2, 2)


def test_image_folder_errors_name_the_path(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    (empty / "cls").mkdir(parents=True)
    with pytest.raises(DataError, match=rf"{empty} holds no images"):
        load_source(DataArgs(dataset="imagefolder", data_cache_dir=str(empty)))
    tree = tmp_path / "tree"
    _image_tree(tree / "train", {"a": 2, "b": 2})
    _image_tree(tree / "test", {"a": 1, "zebra": 1})
    with pytest.raises(DataError, match=rf"{tree / 'test' / 'zebra'}.*outside \[0, 2\)"):
        load_source(DataArgs(dataset="imagefolder", data_cache_dir=str(tree)))
    broken = _image_tree(tmp_path / "broken", {"a": 2})
    (broken / "a" / "9.png").write_bytes(b"\x89PNG truncated")
    src = load_source(DataArgs(dataset="imagefolder", data_cache_dir=str(broken)), hold_out_test=False)
    with pytest.raises(DataError, match="9.png"):
        src.train.load_uint8((8, 8))
