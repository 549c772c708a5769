"""Text on the device: sources read offline into the project's `Source` (labels = categories, `texts` = the
documents), and the datasets a text backbone trains and evaluates on.

Sources (`data_args.dataset`), each split into categories that partition across devices like image classes
(IID, Dirichlet over categories, shards):
- `fortunes`: the Debian `fortunes` package, one file per category (`%` separates entries); `data_cache_dir`
  is its directory, by default the first of `FORTUNE_DIRS` that exists; `text_categories` picks files.
- `textfolder`: `data_cache_dir/<category>/*.txt`, one document per file (or `train/` and `test/` sub-trees).
- `jsonl`: a `.jsonl` file (or a directory of them): one object per line with `text`, or `prompt` and
  `response` (joined by a newline), and an optional `category` (or `label`).
Datasets: a causal LM trains on its documents tokenised, joined by the end-of-text id and PACKED into blocks of
`max_seq_len` (no padding); held-out documents are evaluated one per row (truncated, right-padded, targets
-100 on padding) so losses and next-token accuracy can be reported per category. A classifier gets one row per
document (truncated, padded) and its category as the label.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from fedpeft_edge.config import DataArgs
from fedpeft_edge.errors import DataError
from fedpeft_edge.llm.spec import TextSpec, TextTokenizer
from fedpeft_edge.training import IGNORE_INDEX

log = logging.getLogger(__name__)

#: Where distributions install the fortunes files (Debian/Ubuntu, then Fedora/Arch, then BSD-style).
FORTUNE_DIRS = ("/usr/share/games/fortunes", "/usr/share/fortune", "/usr/share/fortunes", "/usr/share/games/fortune")

Sample = tuple[torch.Tensor, torch.Tensor]


def load_text_source(data_args: DataArgs) -> tuple[Any, Any, tuple[str, ...], str]:
    """(train Split, test Split or None, category names, location) for a text `data_args.dataset`."""
    from fedpeft_edge.data.datasets import Split

    if data_args.dataset == "fortunes":
        root = _fortune_dir(data_args)
        docs = _read_fortunes(root, data_args.text_categories)
        test_docs = None
    elif data_args.dataset == "textfolder":
        root = _dir(data_args)
        if (root / "train").is_dir():
            docs = _read_text_folder(root / "train", data_args.text_categories)
            test_root = next((root / n for n in ("test", "val") if (root / n).is_dir()), None)
            test_docs = _read_text_folder(test_root, data_args.text_categories) if test_root else None
        else:
            docs, test_docs = _read_text_folder(root, data_args.text_categories), None
    else:
        root = _dir(data_args)
        docs, test_docs = _read_jsonl(root, data_args.text_categories), None
    names = tuple(sorted({c for c, _ in docs}))
    if not names:
        raise DataError(f"{data_args.dataset} in {root} holds no text; check data_args.data_cache_dir and "
                        "data_args.text_categories")

    def split(items: list[tuple[str, str]]) -> Any:
        index = {n: i for i, n in enumerate(names)}
        kept = [(c, t) for c, t in items if c in index]
        return Split(labels=np.asarray([index[c] for c, _ in kept], dtype=np.int64),
                     texts=tuple(t for _, t in kept))

    return split(docs), (split(test_docs) if test_docs else None), names, str(root)


def _dir(data_args: DataArgs) -> Path:
    if not data_args.data_cache_dir:
        raise DataError(f"data_args.dataset={data_args.dataset!r} needs data_args.data_cache_dir: the device's "
                        "own text (a directory or .jsonl file)")
    return Path(data_args.data_cache_dir).expanduser()


def _fortune_dir(data_args: DataArgs) -> Path:
    if data_args.data_cache_dir:
        return Path(data_args.data_cache_dir).expanduser()
    for candidate in FORTUNE_DIRS:
        if Path(candidate).is_dir():
            return Path(candidate)
    raise DataError(f"no fortunes directory in {list(FORTUNE_DIRS)}; install Debian's `fortunes` package "
                    "(apt-get install fortunes) or set data_args.data_cache_dir")


def _read_fortunes(root: Path, categories: Sequence[str] | None) -> list[tuple[str, str]]:
    """Every fortune file (a file with its `.dat` index beside it) as (category, entry) pairs."""
    files = sorted(p for p in root.iterdir() if p.is_file() and not p.suffix and p.with_suffix(".dat").exists())
    if categories:
        known = {p.name for p in files}
        unknown = [c for c in categories if c not in known]
        if unknown:
            raise DataError(f"data_args.text_categories {unknown} are not fortune files in {root}; choose from "
                            f"{sorted(known)}")
        files = [p for p in files if p.name in set(categories)]
    docs = []
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        docs += [(path.name, e.strip()) for e in text.split("\n%\n") if e.strip()]
    return docs


def _read_text_folder(root: Path, categories: Sequence[str] | None) -> list[tuple[str, str]]:
    dirs = sorted(p for p in root.iterdir() if p.is_dir() and (not categories or p.name in categories))
    docs = [(d.name, f.read_text(encoding="utf-8", errors="replace").strip())
            for d in dirs for f in sorted(d.glob("*.txt"))]
    return [(c, t) for c, t in docs if t]


def _read_jsonl(root: Path, categories: Sequence[str] | None) -> list[tuple[str, str]]:
    files = sorted(root.glob("*.jsonl")) if root.is_dir() else [root]
    docs = []
    for path in files:
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise DataError(f"cannot read {path}: {exc}; name a .jsonl file or a directory of them") from exc
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{i + 1} is not JSON: {exc}") from exc
            docs.append((str(row.get("category", row.get("label", "text"))), _row_text(row, f"{path}:{i + 1}")))
    return [(c, t) for c, t in docs if not categories or c in categories]


def _row_text(row: Any, where: str) -> str:
    if isinstance(row, dict) and isinstance(row.get("text"), str):
        return str(row["text"])
    if isinstance(row, dict) and isinstance(row.get("prompt"), str) and isinstance(row.get("response"), str):
        return f"{row['prompt']}\n{row['response']}"
    raise DataError(f"{where}: a line needs a string `text`, or `prompt` and `response`")


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
