"""Text sources read offline: documents labelled by category, for text backbones (fedpeft_edge/llm/).

Sources (`data_args.dataset`), each split into categories that partition across devices like image classes
(IID, Dirichlet over categories, shards):
- `fortunes`: the Debian `fortunes` package, one file per category (`%` separates entries); `data_cache_dir`
  is its directory, by default the first of `FORTUNE_DIRS` that exists; `text_categories` picks files.
- `textfolder`: `data_cache_dir/<category>/*.txt`, one document per file (or `train/` and `test/` sub-trees).
- `jsonl`: a `.jsonl` file (or a directory of them): one object per line with `text`, or `prompt` and
  `response` (joined by a newline), and an optional `category` (or `label`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedpeft_edge.config import DataArgs
from fedpeft_edge.errors import DataError

#: Where distributions install the fortunes files (Debian/Ubuntu, then Fedora/Arch, then BSD-style).
FORTUNE_DIRS = ("/usr/share/games/fortunes", "/usr/share/fortune", "/usr/share/fortunes", "/usr/share/games/fortune")

Docs = list[tuple[str, str]]  # (category, text)


def read_text_source(data_args: DataArgs) -> tuple[Docs, Docs | None, tuple[str, ...], str]:
    """(train documents, test documents or None, category names, location) for a text `data_args.dataset`;
    a document is (category, text)."""
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

    return docs, test_docs, names, str(root)


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
