"""Export a run's fine-tuned global model to ONNX: rebuild, load the checkpoint, merge, export, compare."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from fedpeft_edge.backbone import Backbone, build_backbone, fingerprint_backbone
from fedpeft_edge.config import RunConfig, load_config
from fedpeft_edge.errors import ExportError, PeftMethodError
from fedpeft_edge.export.onnx import OPSET, export_onnx, open_session, resolve_input_size
from fedpeft_edge.export.parity import (
    DEFAULT_ATOL,
    DEFAULT_MIN_AGREEMENT,
    ParityResult,
    check_parity,
    parity_inputs,
    require_parity,
)
from fedpeft_edge.peft.base import Manifest, PeftMethod
from fedpeft_edge.peft.registry import build_method
from fedpeft_edge.rundir import read_class_names
from fedpeft_edge.server.checkpoint import Checkpoint, load_checkpoint

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
METADATA_PREFIX = "fedpeft."


@dataclasses.dataclass(frozen=True)
class ExportResult:
    """What `export_run` wrote and how well the export matches PyTorch."""

    path: Path
    size_bytes: int
    metadata: dict[str, str]
    parity: ParityResult
    export_s: float


@dataclasses.dataclass(frozen=True)
class _Rebuilt:
    model: nn.Module
    method: PeftMethod
    manifest: Manifest
    fingerprint: str
    backbone_name: str
    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]


def export_run(
    run_dir: str | Path,
    out: str | Path,
    round_idx: int | None = None,
    parity_samples: int = 64,
    atol: float = DEFAULT_ATOL,
    min_agreement: float = DEFAULT_MIN_AGREEMENT,
    num_threads: int | None = None,
    opset: int = OPSET,
) -> ExportResult:
    """Export round `round_idx` (default: the latest) of run_dir to `out`; ExportError if parity fails."""
    root = Path(run_dir)
    cfg = _load_run_config(root)
    ckpt = load_checkpoint(root, round_idx)
    rebuilt = rebuild_model(cfg, ckpt)
    start = time.perf_counter()
    exportable = rebuilt.method.export_model(rebuilt.model)
    metadata = export_metadata(cfg, ckpt, rebuilt, read_class_names(root) or cfg.data_args.class_names)
    data = export_onnx(exportable, rebuilt.input_size, metadata, opset=opset)
    export_s = time.perf_counter() - start
    inputs = parity_inputs(rebuilt.input_size, rebuilt.mean, rebuilt.std, n=parity_samples)
    parity = check_parity(rebuilt.model, open_session(data, num_threads), inputs, atol, min_agreement)
    require_parity(parity)
    path = _write_atomic(Path(out), data)
    log.info("exported round %d of run %s to %s (%d bytes)", ckpt.round, ckpt.run_id, path, len(data))
    return ExportResult(path=path, size_bytes=len(data), metadata=metadata, parity=parity, export_s=export_s)


def load_run_config(root: Path) -> RunConfig:
    """The config.yaml a server wrote into a run directory."""
    return _load_run_config(root)


def _load_run_config(root: Path) -> RunConfig:
    path = root / CONFIG_FILE
    if not path.exists():
        raise ExportError(f"{root} holds no {CONFIG_FILE}; pass a run directory written by the server")
    return load_config(path)


def rebuild_model(cfg: RunConfig, ckpt: Checkpoint) -> _Rebuilt:
    """The run's backbone with its method applied and the checkpoint's tensors loaded, after checking both
    the manifest hash and the frozen-backbone fingerprint against the checkpoint."""
    backbone, method, model, manifest, fingerprint = rebuild_checked(cfg, ckpt)
    spec = backbone.data_config
    input_size = resolve_input_size(spec.input_size, cfg.data_args.image_size)  # type: ignore[union-attr]
    return _Rebuilt(model, method, manifest, fingerprint, backbone.name, input_size,
                    tuple(spec.mean), tuple(spec.std))  # type: ignore[union-attr]


def rebuild_checked(cfg: RunConfig, ckpt: Checkpoint) -> tuple[Backbone, PeftMethod, nn.Module, Manifest, str]:
    """(backbone, method, model with the checkpoint's tensors, manifest, fingerprint), both checked against
    the checkpoint: what every export (ONNX, a text model's safetensors) starts from."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.common_args.random_seed)  # as the server builds it (matters for weights="none")
        backbone = build_backbone(cfg.model_args, image_size=cfg.data_args.image_size)
        method = build_method(cfg.peft_args)
        model = method.apply(backbone.model)
    manifest = method.manifest(model)
    if ckpt.manifest_hash and manifest.hash != ckpt.manifest_hash:
        raise ExportError(
            f"checkpoint round {ckpt.round} has manifest hash {ckpt.manifest_hash[:16]}..., but the model "
            f"rebuilt from {CONFIG_FILE} ({cfg.model_args.model}, method {cfg.peft_args.method}) has "
            f"{manifest.hash[:16]}...; the run's {CONFIG_FILE} does not describe this checkpoint: "
            "export from the run directory that wrote it"
        )
    fingerprint = fingerprint_backbone(model, manifest)
    if ckpt.fingerprint and fingerprint != ckpt.fingerprint:
        raise ExportError(
            f"frozen backbone fingerprint {fingerprint[:16]}... differs from the checkpoint's "
            f"{ckpt.fingerprint[:16]}...: the backbone weights ({cfg.model_args.weights}) are not the ones "
            "the run trained on; restore the same weights file or package version"
        )
    try:
        method.set_state(model, ckpt.state)
    except PeftMethodError as exc:
        raise ExportError(
            f"checkpoint round {ckpt.round} does not load into the rebuilt model: {exc}"
        ) from exc
    return backbone, method, model, manifest, fingerprint


def export_metadata(cfg: RunConfig, ckpt: Checkpoint, rebuilt: _Rebuilt,
                    class_names: Sequence[str] | None = None) -> dict[str, str]:
    """The metadata_props written into the ONNX file (all values are strings; lists as JSON); `class_names`
    (the run's, label i = class_names[i]) as `class_names` when known."""
    names = {METADATA_PREFIX + "class_names": json.dumps(list(class_names))} if class_names else {}
    return {**names,
        METADATA_PREFIX + "backbone": rebuilt.backbone_name,
        METADATA_PREFIX + "backbone_fingerprint": rebuilt.fingerprint,
        METADATA_PREFIX + "method": rebuilt.manifest.method,
        METADATA_PREFIX + "manifest_hash": rebuilt.manifest.hash,
        METADATA_PREFIX + "run_id": ckpt.run_id or cfg.common_args.run_id,
        METADATA_PREFIX + "round": str(ckpt.round),
        METADATA_PREFIX + "num_classes": str(cfg.model_args.num_classes),
        METADATA_PREFIX + "input_size": json.dumps(list(rebuilt.input_size)),
        METADATA_PREFIX + "mean": json.dumps(list(rebuilt.mean)),
        METADATA_PREFIX + "std": json.dumps(list(rebuilt.std)),
    }


def _write_atomic(path: Path, data: bytes) -> Path:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as exc:
        raise ExportError(f"cannot write {path}: {exc}; choose a writable --out path") from exc
    return path
