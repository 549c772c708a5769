"""A causal-LM run exported for inference: LoRA merged, safetensors + config written, loaded back, compared."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_text import TINY_LLAMA

from fedpeft_edge.config import config_from_dict, dump_config
from fedpeft_edge.errors import ExportError
from fedpeft_edge.export.text import export_text_run
from fedpeft_edge.peft import build_method
from fedpeft_edge.server.checkpoint import save_checkpoint


def _run_dir(tmp_path: Path) -> Path:
    from fedpeft_edge.backbone import build_backbone, fingerprint_backbone

    cfg = config_from_dict({"model_args": {"model": "tiny", "family": "causal_lm", "weights": "none",
                                           "model_kwargs": TINY_LLAMA},
                            "peft_args": {"method": "lora"}, "common_args": {"run_id": "x", "random_seed": 5}})
    run = tmp_path / "run"
    run.mkdir()
    dump_config(cfg, run / "config.yaml")
    torch.manual_seed(5)
    method = build_method(cfg.peft_args)
    model = method.apply(build_backbone(cfg.model_args).model)
    manifest = method.manifest(model)
    state = {k: torch.randn_like(v) * 0.1 for k, v in method.get_state(model).items()}  # a trained adapter
    save_checkpoint(run, 1, state, manifest_json=manifest.to_json(), manifest_hash=manifest.hash,
                    fingerprint=fingerprint_backbone(model, manifest), run_id="x")
    return run


def test_the_merged_model_is_written_and_matches_pytorch(tmp_path: Path) -> None:
    run = _run_dir(tmp_path)
    res = export_text_run(run, tmp_path / "out", prompts=("hello", "federated edge"))
    assert (tmp_path / "out" / "model.safetensors").is_file() and (tmp_path / "out" / "config.json").is_file()
    assert res.passed and res.round == 1 and res.positions == len("hello") + len("federated edge")
    from safetensors.torch import load_file

    names = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert not any("lora" in k for k in names)  # merged: a plain Llama
    assert res.gguf is not None and res.gguf.is_file() and res.gguf_agreement == 1.0  # q/k permuted right


def test_a_tight_bound_fails_loudly(tmp_path: Path) -> None:
    run = _run_dir(tmp_path)
    with pytest.raises(ExportError, match="differs from PyTorch"):
        export_text_run(run, tmp_path / "out", prompts=("hello",), atol=-1.0)
