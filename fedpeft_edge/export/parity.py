"""Parity of an exported model: onnxruntime against PyTorch on real images, with a pass/fail tolerance."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F
from torch import nn

from fedpeft_edge.errors import ExportError
from fedpeft_edge.export.onnx import INPUT_NAME

log = logging.getLogger(__name__)

DEFAULT_ATOL = 1e-3
DEFAULT_MIN_AGREEMENT = 0.99


@dataclasses.dataclass(frozen=True)
class ParityResult:
    """How far onnxruntime's logits are from PyTorch's on the same inputs."""

    samples: int
    max_abs_diff: float
    mean_abs_diff: float
    top1_agreement: float  # fraction of inputs with the same argmax
    ties: int  # disagreements where PyTorch's two logits differ by less than atol (numerical ties)
    atol: float
    min_agreement: float

    @property
    def passed(self) -> bool:
        """Logits within atol, and top-1 agreement (ties forgiven) at least min_agreement."""
        forgiven = self.top1_agreement + self.ties / max(self.samples, 1)
        return self.max_abs_diff <= self.atol and forgiven >= self.min_agreement

    def describe(self) -> str:
        """One line for logs and the CLI."""
        return (
            f"parity on {self.samples} inputs: max |diff| {self.max_abs_diff:.3g} "
            f"(tolerance {self.atol:.3g}), "
            f"mean |diff| {self.mean_abs_diff:.3g}, top-1 agreement {self.top1_agreement:.2%} "
            f"(minimum {self.min_agreement:.0%}, numerical ties {self.ties})"
        )


def parity_inputs(
    input_size: Sequence[int], mean: Sequence[float], std: Sequence[float], n: int = 64, seed: int = 0
) -> torch.Tensor:
    """`n` real images (scikit-learn's digits) resized to input_size (C, H, W) and normalised by mean/std."""
    from sklearn.datasets import load_digits  # only the parity check needs scikit-learn

    if n <= 0:
        raise ExportError(f"parity needs at least one input, got n={n}")
    channels, height, width = (int(s) for s in input_size)
    images = load_digits().images.astype(np.float32) / 16.0  # (1797, 8, 8) in [0, 1]
    order = np.random.default_rng(seed).permutation(len(images))
    picked = images[np.resize(order, n)]
    x = torch.from_numpy(picked).unsqueeze(1)
    x = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False).repeat(1, channels, 1, 1)
    m = torch.tensor(_per_channel(mean, channels, "mean")).view(1, channels, 1, 1)
    s = torch.tensor(_per_channel(std, channels, "std")).view(1, channels, 1, 1)
    return ((x - m) / s).contiguous()


def _per_channel(values: Sequence[float], channels: int, what: str) -> list[float]:
    vals = [float(v) for v in values]
    if len(vals) == 1:
        return vals * channels
    if len(vals) != channels:
        raise ExportError(
            f"{what} has {len(vals)} values for {channels} input channels; give one value per channel"
        )
    return vals


def check_parity(
    model: nn.Module,
    session: ort.InferenceSession,
    inputs: torch.Tensor,
    atol: float = DEFAULT_ATOL,
    min_agreement: float = DEFAULT_MIN_AGREEMENT,
    batch_size: int = 32,
) -> ParityResult:
    """Run `inputs` through both the model (eval mode, no grad) and the session; compare logits and top-1."""
    ref, got = _torch_logits(model, inputs, batch_size), _ort_logits(session, inputs, batch_size)
    if ref.shape != got.shape:
        raise ExportError(f"onnxruntime returned logits of shape {got.shape}, PyTorch {ref.shape}; re-export")
    diff = np.abs(ref - got)
    same = ref.argmax(1) == got.argmax(1)
    rows = np.arange(len(ref))
    gap = ref[rows, ref.argmax(1)] - ref[rows, got.argmax(1)]
    result = ParityResult(
        samples=len(ref),
        max_abs_diff=float(diff.max()) if diff.size else 0.0,
        mean_abs_diff=float(diff.mean()) if diff.size else 0.0,
        top1_agreement=float(same.mean()) if len(same) else 1.0,
        ties=int(np.sum(~same & (gap <= atol))),
        atol=atol,
        min_agreement=min_agreement,
    )
    log.info("%s", result.describe())
    return result


def require_parity(result: ParityResult) -> None:
    """Raise ExportError unless the parity result passed."""
    if not result.passed:
        raise ExportError(
            f"the exported model disagrees with PyTorch: {result.describe()}; re-export with a newer opset, "
            "or report the model and method as unsupported"
        )


def _torch_logits(model: nn.Module, inputs: torch.Tensor, batch_size: int) -> np.ndarray:
    was_training = model.training
    model.eval()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    outs = []
    try:
        with torch.no_grad():
            for chunk in inputs.split(batch_size):
                outs.append(model(chunk.to(device)).float().cpu().numpy())
    finally:
        model.train(was_training)
    return np.concatenate(outs)


def _ort_logits(session: ort.InferenceSession, inputs: torch.Tensor, batch_size: int) -> np.ndarray:
    chunks = inputs.split(batch_size)
    outs = [session.run(None, {INPUT_NAME: c.numpy().astype(np.float32)})[0] for c in chunks]
    return np.concatenate(outs).astype(np.float32)
