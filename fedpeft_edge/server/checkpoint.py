"""Server checkpoints: the global PEFT tensors of every completed round, plus what a resume needs.

Layout inside a run directory:
  checkpoints/round_<NNNN>.safetensors  global tensors (manifest order) + strategy tensors ("strategy/<name>"),
                                        metadata: run_id, round, method, manifest (JSON), manifest_hash,
                                        fingerprint
  checkpoint.json                       the latest completed round: its file, RNG state, selection history,
                                        counters; written atomically after the tensors file
Readable by any safetensors implementation; nothing is pickled.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from fedpeft_edge.errors import CheckpointError
from fedpeft_edge.peft.base import Manifest

STRATEGY_PREFIX = "strategy/"
POINTER = "checkpoint.json"


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """One completed round as saved on disk."""

    round: int
    state: dict[str, torch.Tensor]
    strategy_state: dict[str, torch.Tensor]
    manifest_json: str
    manifest_hash: str
    fingerprint: str
    run_id: str
    extra: dict[str, Any]


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def save_checkpoint(
    run_dir: str | Path,
    round_idx: int,
    state: Mapping[str, torch.Tensor],
    *,
    manifest_json: str,
    manifest_hash: str,
    fingerprint: str,
    run_id: str,
    strategy_state: Mapping[str, torch.Tensor] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write round `round_idx`'s global tensors and make it the latest checkpoint; returns the tensors file."""
    root = Path(run_dir)
    ckdir = root / "checkpoints"
    ckdir.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().cpu().contiguous() for name, t in state.items()}
    for name, t in (strategy_state or {}).items():
        tensors[STRATEGY_PREFIX + name] = t.detach().cpu().contiguous()
    meta = {
        "run_id": run_id,
        "round": str(round_idx),
        "manifest": manifest_json,
        "manifest_hash": manifest_hash,
        "fingerprint": fingerprint,
    }
    path = ckdir / f"round_{round_idx:04d}.safetensors"
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)
    pointer = {
        "round": round_idx,
        "file": str(path.relative_to(root)),
        "run_id": run_id,
        "manifest_hash": manifest_hash,
        "fingerprint": fingerprint,
        "extra": dict(extra or {}),
    }
    _atomic_write_text(root / POINTER, json.dumps(pointer, indent=1))
    return path


def latest_round(run_dir: str | Path) -> int | None:
    """The last completed round recorded in run_dir, or None when it holds no checkpoint."""
    pointer = Path(run_dir) / POINTER
    if not pointer.exists():
        return None
    return int(_read_pointer(pointer)["round"])


def _read_pointer(pointer: Path) -> dict[str, Any]:
    try:
        data = json.loads(pointer.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(
            f"checkpoint pointer {pointer} is unreadable: {exc}; restore it or start a new run"
        ) from exc
    if not isinstance(data, dict) or not isinstance(data.get("round"), int):
        raise CheckpointError(f"checkpoint pointer {pointer} has no integer 'round'; restore it or start a new run")
    return data


def load_checkpoint(run_dir: str | Path, round_idx: int | None = None) -> Checkpoint:
    """Load the latest checkpoint of run_dir, or the one of `round_idx`."""
    root = Path(run_dir)
    if not root.is_dir():
        raise CheckpointError(f"run directory {root} does not exist; pass the directory a server run wrote")
    pointer_path = root / POINTER
    if not pointer_path.exists():
        raise CheckpointError(f"{root} holds no {POINTER}: no round completed in this run yet")
    pointer = _read_pointer(pointer_path)
    extra: dict[str, Any] = pointer.get("extra", {}) if round_idx in (None, pointer["round"]) else {}
    rnd = pointer["round"] if round_idx is None else round_idx
    path = root / "checkpoints" / f"round_{rnd:04d}.safetensors"
    if not path.exists():
        have = sorted(p.name for p in (root / "checkpoints").glob("round_*.safetensors"))
        raise CheckpointError(
            f"no checkpoint for round {rnd} in {root}/checkpoints (have: {', '.join(have) or 'none'})"
        )
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(
            f"checkpoint {path} is corrupt: {exc}; resume from an earlier round with --round"
        ) from exc
    state = {k: v for k, v in tensors.items() if not k.startswith(STRATEGY_PREFIX)}
    order = list(Manifest.from_json(meta["manifest"]).names) if meta.get("manifest") else []
    if order and set(order) == set(state):
        state = {name: state[name] for name in order}
    strategy = {k[len(STRATEGY_PREFIX):]: v for k, v in tensors.items() if k.startswith(STRATEGY_PREFIX)}
    return Checkpoint(
        round=rnd,
        state=state,
        strategy_state=strategy,
        manifest_json=meta.get("manifest", ""),
        manifest_hash=meta.get("manifest_hash", ""),
        fingerprint=meta.get("fingerprint", ""),
        run_id=meta.get("run_id", ""),
        extra=extra,
    )
