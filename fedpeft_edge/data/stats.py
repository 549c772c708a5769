"""Per-device data statistics for the join message and the run report (JSON-able), and label entropy.

`data_stats(train_labels, test_labels, num_classes) -> {"num_train", "num_test", "label_hist",
"test_label_hist", "num_classes"}`: `label_hist` is the training split's per-class count list (length
num_classes), the `data_stats` fields design.md names for `join` records.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedpeft_edge.errors import DataError


def label_histogram(labels: np.ndarray, num_classes: int) -> list[int]:
    """Per-class counts as plain ints (length num_classes)."""
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"labels span [{labels.min()}, {labels.max()}], outside [0, {num_classes})")
    return [int(c) for c in np.bincount(labels, minlength=num_classes)]


def label_entropy(labels: np.ndarray, num_classes: int) -> float:
    """Shannon entropy (bits) of the label distribution; 0.0 for an empty set."""
    counts = np.asarray(label_histogram(labels, num_classes), dtype=np.float64)
    total = counts.sum()
    if total == 0:
        return 0.0
    p = counts[counts > 0] / total
    return float(-(p * np.log2(p)).sum())


def data_stats(train_labels: np.ndarray, test_labels: np.ndarray, num_classes: int) -> dict[str, Any]:
    """JSON-able sample counts and label histograms of one device's data."""
    return {
        "num_train": int(len(train_labels)),
        "num_test": int(len(test_labels)),
        "label_hist": label_histogram(train_labels, num_classes),
        "test_label_hist": label_histogram(test_labels, num_classes),
        "num_classes": int(num_classes),
    }
