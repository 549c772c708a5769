"""Export a causal-LM run for on-device inference: the LoRA adapter merged into the base, written as a Hugging
Face directory (safetensors + config + tokenizer) that transformers, or any runtime reading that layout, serves
without this project; then loaded back and compared with the PyTorch model (adapter unmerged) on prompts.

Parity: the greatest |logit difference| over every position of the prompts, and the share of positions whose
greedy next token agrees; ExportError when either misses its bound.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch
from torch import nn

from fedpeft_edge.errors import ExportError

log = logging.getLogger(__name__)

DEFAULT_PROMPTS = ("The capital of France is", "A computer is a machine that", "Bread is made from")
DEFAULT_ATOL = 1e-3
MIN_AGREEMENT = 0.99


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

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.atol and self.agreement >= MIN_AGREEMENT


def export_text_run(run_dir: str | Path, out: str | Path, round_idx: int | None = None,
                    prompts: tuple[str, ...] = DEFAULT_PROMPTS, atol: float = DEFAULT_ATOL) -> TextExport:
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
    lm = getattr(merged, "lm", None)
    if not isinstance(lm, nn.Module) or not hasattr(lm, "save_pretrained"):
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
    diff, agree, n = _parity(model, directory, ids)
    size = sum(f.stat().st_size for f in directory.iterdir() if f.is_file())
    result = TextExport(directory, size, ckpt.round, n, diff, agree, atol)
    if not result.passed:
        raise ExportError(f"the written model differs from PyTorch: max |logit diff| {diff:.3g} (bound {atol:g}), "
                          f"greedy agreement {agree:.2%} (bound {MIN_AGREEMENT:.0%}); do not serve {directory}")
    log.info("exported round %d of %s to %s (%d bytes), max |diff| %.3g", ckpt.round, root, directory, size, diff)
    return result


@torch.no_grad()
def _parity(model: nn.Module, directory: Path, prompts: list[list[int]]) -> tuple[float, float, int]:
    """(max |logit diff|, greedy agreement, positions) of the saved model, loaded back, against `model`."""
    from transformers import AutoModelForCausalLM

    written = AutoModelForCausalLM.from_pretrained(str(directory), local_files_only=True, dtype=torch.float32)
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
