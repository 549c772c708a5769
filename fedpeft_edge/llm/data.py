"""Text on the device: the datasets a text backbone trains and evaluates on, built from a text `Source`
(labels = categories, `texts` = the documents; the sources themselves are read in data/text.py).

Datasets: a causal LM trains on its documents tokenised, joined by the end-of-text id and PACKED into blocks of
`max_seq_len` (no padding); held-out documents are evaluated one per row (truncated, right-padded, targets
-100 on padding) so losses and next-token accuracy can be reported per category. A classifier gets one row per
document (truncated, padded) and its category as the label.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from fedpeft_edge.config import DataArgs
from fedpeft_edge.errors import DataError
from fedpeft_edge.llm.spec import TextSpec, TextTokenizer
from fedpeft_edge.training import IGNORE_INDEX

log = logging.getLogger(__name__)

Sample = tuple[torch.Tensor, torch.Tensor]


# --- datasets ---------------------------------------------------------------------------------------------


class TextRows(Dataset[Sample]):
    """Token rows and their targets, held as int64 tensors (the device's whole tokenised text)."""

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor, categories: np.ndarray | None = None) -> None:
        self.inputs, self.targets, self.categories = inputs, targets, categories

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    @property
    def nbytes(self) -> int:
        return int(self.inputs.numel() * 8 + self.targets.numel() * 8)

    def __getitem__(self, i: int) -> Sample:
        return self.inputs[i], self.targets[i]

    def __getitems__(self, indices: list[int]) -> list[Sample]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return list(zip(self.inputs[idx].unbind(0), self.targets[idx].unbind(0), strict=True))


def packed_rows(texts: Sequence[str], tokenizer: TextTokenizer, seq_len: int) -> TextRows:
    """Documents joined by end-of-text and cut into blocks of `seq_len` inputs (targets: the next ids); the
    last partial block is padded (targets -100)."""
    ids: list[int] = []
    for t in texts:
        ids += tokenizer.encode(t) + [tokenizer.eos_id]
    n_blocks = max(1, -(-(len(ids) - 1) // seq_len)) if len(ids) > 1 else 0
    inputs = torch.full((n_blocks, seq_len), tokenizer.pad_id, dtype=torch.long)
    targets = torch.full((n_blocks, seq_len), IGNORE_INDEX, dtype=torch.long)
    flat = torch.as_tensor(ids, dtype=torch.long)
    for b in range(n_blocks):
        chunk = flat[b * seq_len: b * seq_len + seq_len + 1]
        inputs[b, : len(chunk) - 1] = chunk[:-1]
        targets[b, : len(chunk) - 1] = chunk[1:]
    return TextRows(inputs, targets)


def document_rows(texts: Sequence[str], labels: np.ndarray, spec: TextSpec, seq_len: int) -> TextRows:
    """One row per document, truncated to `seq_len` and right-padded: next-token targets for a causal LM
    (-100 on padding), the category for a classifier."""
    tok = spec.tokenizer
    inputs = torch.full((len(texts), seq_len), tok.pad_id, dtype=torch.long)
    lm = spec.task == "causal_lm"
    targets = torch.full((len(texts), seq_len), IGNORE_INDEX, dtype=torch.long) if lm else \
        torch.as_tensor(np.asarray(labels, dtype=np.int64))
    for i, text in enumerate(texts):
        ids = (tok.encode(text) + [tok.eos_id])[: seq_len + 1] if lm else tok.encode(text)[:seq_len]
        row = ids[:-1] if lm else ids
        inputs[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
        if lm:
            targets[i, : len(row)] = torch.as_tensor(ids[1:], dtype=torch.long)
    return TextRows(inputs, targets, np.asarray(labels, dtype=np.int64))


def text_dataset(split: Any, spec: TextSpec, data_args: DataArgs, train: bool) -> TextRows:
    """The dataset of one split: packed blocks for causal-LM training, one row per document otherwise."""
    if split.texts is None:
        raise DataError(f"data_args.dataset={data_args.dataset!r} holds images, but the backbone takes text; "
                        "use a text source (fortunes, textfolder, jsonl)")
    if train and spec.task == "causal_lm":
        return packed_rows(split.texts, spec.tokenizer, data_args.max_seq_len)
    return document_rows(split.texts, split.labels, spec, data_args.max_seq_len)


def category_loaders(loader: Any, names: Sequence[str]) -> dict[str, DataLoader[Sample]]:
    """The rows of `loader` per category (for per-category held-out metrics), or {} when it has none."""
    data = getattr(loader, "dataset", None)
    if not isinstance(data, TextRows) or data.categories is None:
        return {}
    out = {}
    for c, name in enumerate(names):
        idx = np.flatnonzero(data.categories == c).tolist()
        if idx:
            out[name] = DataLoader(Subset(data, idx), batch_size=loader.batch_size, shuffle=False)
    return out
