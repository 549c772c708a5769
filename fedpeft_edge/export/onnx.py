"""Turn a PyTorch model into ONNX bytes (TorchScript exporter, dynamic batch) and carry run metadata in it."""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

import onnx
import onnxruntime as ort
import torch
from torch import nn

from fedpeft_edge.errors import ExportError

log = logging.getLogger(__name__)

OPSET = 17
INPUT_NAME = "input"
OUTPUT_NAME = "logits"


class InputLike(Protocol):
    """What the export needs to know about the model's input (backbone.InputSpec satisfies it)."""

    @property
    def input_size(self) -> tuple[int, ...]: ...

    @property
    def mean(self) -> tuple[float, ...]: ...

    @property
    def std(self) -> tuple[float, ...]: ...


def resolve_input_size(input_size: Sequence[int], image_size: int | None) -> tuple[int, int, int]:
    """The (C, H, W) a run feeds its model: the backbone's size unless data_args.image_size overrides it."""
    channels, height, width = (int(s) for s in input_size)
    return (channels, image_size, image_size) if image_size else (channels, height, width)


def export_onnx(
    model: nn.Module,
    input_size: Sequence[int],
    metadata: Mapping[str, str] | None = None,
    opset: int = OPSET,
) -> bytes:
    """The model as an ONNX file (bytes): input "input" (batch, C, H, W), output "logits" (batch, classes).

    The batch axis is dynamic; the model is traced in eval mode and its previous mode restored.
    """
    if len(input_size) != 3 or any(int(s) <= 0 for s in input_size):
        raise ExportError(f"input_size must be (C, H, W) with positive sizes, got {tuple(input_size)}")
    sample = torch.zeros((2, *(int(s) for s in input_size)), dtype=torch.float32)
    device = _model_device(model)
    was_training = model.training
    buf = io.BytesIO()
    model.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer and deprecation warnings say nothing the user can act on
            torch.onnx.export(
                model,
                (sample.to(device),),
                buf,  # type: ignore[arg-type]  # the TorchScript exporter accepts file objects
                dynamo=False,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                do_constant_folding=True,
            )
    except Exception as exc:  # the exporter raises many unrelated types
        raise ExportError(
            f"torch.onnx.export failed for {type(model).__name__} with input {tuple(input_size)} at opset "
            f"{opset}: {type(exc).__name__}: {exc}; check that the model traces "
            "(no data-dependent control flow)"
        ) from exc
    finally:
        model.train(was_training)
    data = buf.getvalue()
    return set_metadata(data, metadata) if metadata else data


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def set_metadata(model_bytes: bytes, metadata: Mapping[str, str]) -> bytes:
    """The ONNX file with `metadata` written into its metadata_props (replacing keys of the same name)."""
    proto = onnx.load_from_string(model_bytes)
    props = {p.key: p.value for p in proto.metadata_props}
    props.update({str(k): str(v) for k, v in metadata.items()})
    del proto.metadata_props[:]
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    return bytes(proto.SerializeToString())


def read_metadata(source: str | Path | bytes) -> dict[str, str]:
    """The metadata_props of an ONNX file (path or bytes) as a dict."""
    try:
        proto = onnx.load_from_string(source) if isinstance(source, bytes) else onnx.load(str(source))
    except Exception as exc:  # onnx raises DecodeError, OSError, ValidationError ...
        raise ExportError(
            f"cannot read ONNX file {_describe(source)}: {exc}; pass a file `fedpeft-edge export` wrote"
        ) from exc
    return {p.key: p.value for p in proto.metadata_props}


def open_session(source: str | Path | bytes, num_threads: int | None = None) -> ort.InferenceSession:
    """An onnxruntime CPU session on an ONNX file (path or bytes) with `num_threads` intra-op threads."""
    opts = ort.SessionOptions()
    if num_threads is not None:
        if num_threads <= 0:
            raise ExportError(f"num_threads must be a positive integer or None, got {num_threads}")
        opts.intra_op_num_threads = num_threads
        opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    try:
        src = source if isinstance(source, bytes) else str(source)
        return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own untyped errors
        raise ExportError(
            f"onnxruntime cannot open {_describe(source)}: {exc}; re-export it with `fedpeft-edge export`"
        ) from exc


def _describe(source: str | Path | bytes) -> str:
    return f"<{len(source)} bytes>" if isinstance(source, bytes) else str(source)
