"""ONNX export of a fine-tuned model, its parity check, and on-device inference through onnxruntime.

`export_run` (rebuild a run's model from its checkpoint and export it) lives in `fedpeft_edge.export.exporter`
so that agents importing the evaluator do not load the checkpoint and config machinery.
"""

from fedpeft_edge.export.inference import OnnxEvalResult, OnnxEvaluator, measure_latency
from fedpeft_edge.export.onnx import (
    INPUT_NAME,
    OPSET,
    OUTPUT_NAME,
    export_onnx,
    open_session,
    read_metadata,
    resolve_input_size,
    set_metadata,
)
from fedpeft_edge.export.parity import ParityResult, check_parity, parity_inputs, require_parity

__all__ = [
    "INPUT_NAME",
    "OPSET",
    "OUTPUT_NAME",
    "OnnxEvalResult",
    "OnnxEvaluator",
    "ParityResult",
    "check_parity",
    "export_onnx",
    "measure_latency",
    "open_session",
    "parity_inputs",
    "read_metadata",
    "require_parity",
    "resolve_input_size",
    "set_metadata",
]
