"""Export a causal-LM run for on-device inference: the LoRA adapter merged into the base, written as a Hugging
Face directory (safetensors + config + tokenizer) that transformers, or any runtime reading that layout, serves
without this project, and (Llama family) as an F32 GGUF file for llama.cpp (`llm/gguf_export.py`); each is loaded
back with transformers and compared with the PyTorch model (adapter unmerged) on prompts.

Parity: the greatest |logit difference| over every position of the prompts, and the share of positions whose
greedy next token agrees; ExportError when either misses its bound.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedpeft_edge.config import ModelArgs
from fedpeft_edge.errors import ExportError

log = logging.getLogger(__name__)

DEFAULT_PROMPTS = ("The capital of France is", "A computer is a machine that", "Bread is made from")
DEFAULT_ATOL = 1e-3
MIN_AGREEMENT = 0.99
GGUF_NAME = "model-f32.gguf"


@dataclasses.dataclass(frozen=True)
class TextExport:
    """What `export_text_run` wrote and how closely the written model matches PyTorch."""

    path: Path
    size_bytes: int
    round: int
    positions: int
    max_abs_diff: float
    agreement: float
    atol: float
    gguf: Path | None = None  # the GGUF file for llama.cpp (Llama-family models), checked the same way
    gguf_max_abs_diff: float | None = None
    gguf_agreement: float | None = None

    @property
    def passed(self) -> bool:
        ok = self.max_abs_diff <= self.atol and self.agreement >= MIN_AGREEMENT
        if self.gguf is not None:
            ok = ok and (self.gguf_max_abs_diff or 0.0) <= self.atol and (self.gguf_agreement or 0.0) >= MIN_AGREEMENT
        return ok


def export_text_run(run_dir: str | Path, out: str | Path, round_idx: int | None = None,
                    prompts: tuple[str, ...] = DEFAULT_PROMPTS, atol: float = DEFAULT_ATOL,
                    with_gguf: bool = True) -> TextExport:
    """Merge round `round_idx` (default: the latest) of a causal-LM run into its base and write it to `out`."""
    from fedpeft_edge.export.exporter import load_run_config, rebuild_checked
    from fedpeft_edge.server.checkpoint import load_checkpoint

    root = Path(run_dir)
    cfg = load_run_config(root)
    if cfg.model_args.family != "causal_lm":
        raise ExportError(f"{root} trained a {cfg.model_args.family} model; this export writes causal LMs "
                          "(an image model exports to ONNX: fedpeft-edge export --out MODEL.onnx)")
    ckpt = load_checkpoint(root, round_idx)
    backbone, method, model, _manifest, _fp = rebuild_checked(cfg, ckpt)
    merged = method.export_model(model)
    lm: Any = getattr(merged, "lm", None)
    if not callable(getattr(lm, "save_pretrained", None)):
        raise ExportError(f"{type(merged).__name__} holds no transformers model to save")
    directory = Path(out)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        lm.save_pretrained(str(directory), safe_serialization=True)
        tokenizer = backbone.data_config.tokenizer  # type: ignore[union-attr]
        if hasattr(tokenizer, "save"):
            tokenizer.save(str(directory))
    except OSError as exc:
        raise ExportError(f"cannot write {directory}: {exc}; choose a writable --out directory") from exc
    tok = backbone.data_config.tokenizer  # type: ignore[union-attr]
    ids = [tok.encode(p) for p in prompts]
    diff, agree, n = _parity(model, directory, None, ids)
    gguf_file: Path | None = None
    gguf_diff = gguf_agree = None
    if with_gguf and getattr(lm.config, "model_type", None) == "llama":
        from fedpeft_edge.llm.gguf_export import write_llama_gguf

        gguf_file = write_llama_gguf(lm, directory / GGUF_NAME, _source_gguf(cfg.model_args))
        gguf_diff, gguf_agree, _n = _parity(model, directory, GGUF_NAME, ids)
    size = sum(f.stat().st_size for f in directory.iterdir() if f.is_file())
    result = TextExport(directory, size, ckpt.round, n, diff, agree, atol, gguf_file, gguf_diff, gguf_agree)
    if not result.passed:
        raise ExportError(f"the written model differs from PyTorch: max |logit diff| {diff:.3g} / GGUF "
                          f"{gguf_diff} (bound {atol:g}), greedy agreement {agree:.2%} / GGUF {gguf_agree} (bound "
                          f"{MIN_AGREEMENT:.0%}); do not serve {directory}")
    log.info("exported round %d of %s to %s (%d bytes), max |diff| %.3g", ckpt.round, root, directory, size, diff)
    return result


def _source_gguf(model_args: ModelArgs) -> Path | None:
    """The GGUF the base came from (its tokenizer keys are copied into the export), if any."""
    if model_args.weights == "smollm2_package":
        from fedpeft_edge.llm.backbone import SMOLLM2_GGUF, _package_dir

        return _package_dir("smollm2_package") / SMOLLM2_GGUF
    path = Path(model_args.checkpoint_path or "")
    return path if model_args.weights == "file" and path.suffix == ".gguf" else None


@torch.no_grad()
def _parity(model: nn.Module, directory: Path, gguf_file: str | None,
            prompts: list[list[int]]) -> tuple[float, float, int]:
    """(max |logit diff|, greedy agreement, positions) of the saved model (safetensors, or the GGUF file),
    loaded back with transformers, against `model`."""
    from transformers import AutoModelForCausalLM

    extra = {"gguf_file": gguf_file} if gguf_file else {}
    written = AutoModelForCausalLM.from_pretrained(str(directory), local_files_only=True, dtype=torch.float32,
                                                   **extra)
    written.eval()
    was = model.training
    model.eval()
    worst, same, total = 0.0, 0, 0
    try:
        for ids in prompts:
            x = torch.tensor([ids], dtype=torch.long)
            ref = model(x)  # the wrapper's (T, V) rows, adapter unmerged
            got = written(input_ids=x, use_cache=False).logits[0]
            worst = max(worst, float((ref - got).abs().max()))
            same += int((ref.argmax(-1) == got.argmax(-1)).sum())
            total += len(ids)
    finally:
        model.train(was)
    return worst, same / max(total, 1), total
