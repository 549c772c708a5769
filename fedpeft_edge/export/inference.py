"""On-device inference through onnxruntime: evaluate the global model each round and measure its latency."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F
from torch import nn

from fedpeft_edge.errors import ExportError
from fedpeft_edge.export.onnx import (
    INPUT_NAME,
    OPSET,
    InputLike,
    export_onnx,
    open_session,
    resolve_input_size,
)
from fedpeft_edge.training import EvalResult

log = logging.getLogger(__name__)


class ExportHook(Protocol):
    """The part of a PeftMethod the evaluator uses: prepare a model for export (e.g. merge LoRA)."""

    def export_model(self, model: nn.Module) -> nn.Module: ...


OnnxEvalResult = EvalResult  # the evaluator returns the same record as training.evaluate


class OnnxEvaluator:
    """Evaluates a model through onnxruntime; `refresh(model)` re-exports it in memory after set_state."""

    def __init__(
        self,
        model: nn.Module,
        input_spec: InputLike,
        num_threads: int | None = None,
        method: ExportHook | None = None,
        opset: int = OPSET,
        image_size: int | None = None,
    ) -> None:
        self.input_spec = input_spec
        self.input_size = resolve_input_size(input_spec.input_size, image_size)
        self.num_threads = num_threads
        self.method = method
        self.opset = opset
        self.model_bytes = b""
        self.export_s = 0.0
        self._session: ort.InferenceSession | None = None
        self.refresh(model)

    @property
    def session(self) -> ort.InferenceSession:
        """The current session (the model as of the last refresh)."""
        if self._session is None:
            raise ExportError("OnnxEvaluator has no session; call refresh(model) first")
        return self._session

    def refresh(self, model: nn.Module) -> None:
        """Export the model's current weights to ONNX in memory and open a new session on them."""
        start = time.perf_counter()
        exportable = self.method.export_model(model) if self.method is not None else model
        self.model_bytes = export_onnx(exportable, self.input_size, opset=self.opset)
        self._session = open_session(self.model_bytes, self.num_threads)
        self.export_s = time.perf_counter() - start
        log.debug("re-exported model to ONNX: %d bytes in %.2f s", len(self.model_bytes), self.export_s)

    def latency(self, runs: int = 20, warmup: int = 3) -> dict[str, float | int]:
        """Batch-1 latency of the current session on this device (for the device profile)."""
        return measure_latency(self.session, self.input_size, runs=runs, warmup=warmup)

    def logits(self, images: torch.Tensor | np.ndarray) -> np.ndarray:
        """Logits for a batch of images (N, C, H, W), float32."""
        arr = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
        if arr.ndim != 4 or tuple(arr.shape[1:]) != self.input_size:
            raise ExportError(
                f"images of shape {tuple(arr.shape)} do not fit the exported input (N, *{self.input_size}); "
                "pass OnnxEvaluator(image_size=data_args.image_size) so it matches the data loader"
            )
        return np.asarray(self.session.run(None, {INPUT_NAME: arr.astype(np.float32, copy=False)})[0])

    def evaluate(self, loader: Iterable[Any]) -> EvalResult:
        """Mean cross-entropy and top-1 over a loader of (images, labels) batches."""
        loss_sum, correct, seen = 0.0, 0, 0
        for batch in loader:
            images, labels = batch[0], torch.as_tensor(batch[1]).long().cpu()
            if labels.numel() == 0:
                continue
            logits = torch.from_numpy(self.logits(images))
            loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
            correct += int((logits.argmax(1) == labels).sum())
            seen += int(labels.numel())
        if seen == 0:
            return EvalResult(loss=float("nan"), top1=float("nan"), samples=0)
        return EvalResult(loss=loss_sum / seen, top1=correct / seen, samples=seen)


def measure_latency(
    session_or_path: ort.InferenceSession | str | Path | bytes,
    input_shape: Sequence[int],
    runs: int = 50,
    warmup: int = 5,
    num_threads: int | None = None,
) -> dict[str, float | int]:
    """Wall time per inference: {"median_ms", "p90_ms", "runs"}; an input_shape (C, H, W) means batch 1."""
    if runs <= 0 or warmup < 0:
        raise ExportError(f"measure_latency needs runs > 0 and warmup >= 0, got runs={runs}, warmup={warmup}")
    shape = tuple(int(s) for s in input_shape)
    if len(shape) == 3:
        shape = (1, *shape)
    if len(shape) != 4:
        raise ExportError(f"input_shape must be (C, H, W) or (N, C, H, W), got {tuple(input_shape)}")
    session = (
        session_or_path
        if isinstance(session_or_path, ort.InferenceSession)
        else open_session(session_or_path, num_threads)
    )
    feed = {INPUT_NAME: np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
    for _ in range(warmup):
        session.run(None, feed)
    times = np.empty(runs)
    for i in range(runs):
        start = time.perf_counter()
        session.run(None, feed)
        times[i] = (time.perf_counter() - start) * 1000.0
    return {"median_ms": float(np.median(times)), "p90_ms": float(np.percentile(times, 90)), "runs": runs}
