"""One label map per run: a device holding some of the run's classes maps its folders by name, never by its own
sorted position (a 2-of-3-class device once trained `cat` as label 0, the run's `bird`)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from fedpeft_edge.config import DataArgs
from fedpeft_edge.data import align_labels, build_local_data
from fedpeft_edge.errors import DataError

SPEC = SimpleNamespace(input_size=(3, 8, 8), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bilinear")
RUN = ("bird", "cat", "dog")


def _tree(root: Path, classes: dict[str, int]) -> Path:
    for i, (name, count) in enumerate(classes.items()):
        (root / name).mkdir(parents=True)
        for j in range(count):
            Image.new("RGB", (8, 8), color=(40 * i, j, 7)).save(root / name / f"{j}.png")
    return root


def _local(root: Path, **kw: object) -> object:
    args = DataArgs(dataset="imagefolder", data_cache_dir=str(root), test_fraction=0.25, batch_size=64, **kw)
    return build_local_data(args, SPEC, seed=0)


def _labels(loader: torch.utils.data.DataLoader) -> list[int]:  # type: ignore[type-arg]
    return sorted(int(y) for _, y in loader.dataset)  # type: ignore[attr-defined]


def test_a_subset_device_maps_its_classes_to_the_run_by_name(tmp_path: Path) -> None:
    data = _local(_tree(tmp_path / "dev", {"cat": 4, "dog": 4}))
    assert data.class_names == ("cat", "dog") and set(data.train_labels) <= {0, 1}  # its own numbering
    aligned = align_labels(data, RUN)
    assert aligned.class_names == RUN and aligned.num_classes == 3
    assert set(aligned.train_labels.tolist()) | set(aligned.test_labels.tolist()) == {1, 2}
    assert _labels(aligned.train_loader) == sorted(aligned.train_labels.tolist())  # the loaders too
    assert _labels(aligned.test_loader) == sorted(aligned.test_labels.tolist())
    assert align_labels(aligned, RUN) is aligned  # a re-join maps nothing twice


def test_a_device_with_a_class_the_run_lacks_is_told_the_fix(tmp_path: Path) -> None:
    data = _local(_tree(tmp_path / "dev", {"cat": 4, "fox": 4}))
    with pytest.raises(DataError, match=r"\['fox'\] are not among the run's classes.*rename the class folders"):
        align_labels(data, RUN)


def test_the_configured_class_list_fixes_the_label_order(tmp_path: Path) -> None:
    data = _local(_tree(tmp_path / "dev", {"cat": 4, "dog": 4}), class_names=RUN)
    assert data.class_names == RUN and set(np.concatenate([data.train_labels, data.test_labels])) == {1, 2}
    with pytest.raises(DataError, match="data_args.class_names"):
        _local(_tree(tmp_path / "other", {"cat": 2, "fox": 2}), class_names=RUN)
