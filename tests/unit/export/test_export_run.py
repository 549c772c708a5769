"""export_run end to end on tiny backbones: every PEFT method, metadata, parity and mismatched runs."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch

from fedpeft_edge.backbone import build_backbone, fingerprint_backbone
from fedpeft_edge.cli import main as cli_main
from fedpeft_edge.config import RunConfig, config_from_dict, dump_config
from fedpeft_edge.data import build_server_test_loader
from fedpeft_edge.errors import ExportError, PeftMethodError
from fedpeft_edge.export import OnnxEvaluator, open_session, parity_inputs, read_metadata
from fedpeft_edge.export.exporter import METADATA_PREFIX, export_run
from fedpeft_edge.peft.base import PeftMethod
from fedpeft_edge.peft.registry import build_method
from fedpeft_edge.server.checkpoint import save_checkpoint
from fedpeft_edge.training import evaluate

torch.set_num_threads(1)

BACKBONES: dict[str, dict[str, Any]] = {
    "vit": {"model": "vit_tiny_patch16_224",
            "model_kwargs": {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}},
    "cnn": {"model": "test_efficientnet", "model_kwargs": {"pad_type": "same"}},  # TF "same" padding
}
METHODS = ("full", "head", "bias", "adapter", "prompt", "lora")
PEFT_SMALL = {"adapter": {"width": 8}, "prompt": {"num_tokens": 4}, "lora": {"r": 4, "alpha": 8}}


def _config_dict(backbone: str, method: str, run_id: str = "export-test") -> dict[str, Any]:
    return {
        "common_args": {"run_id": run_id},
        "data_args": {"image_size": 32},
        "model_args": {**BACKBONES[backbone], "num_classes": 10, "weights": "none"},
        "peft_args": {"method": method, **{k: v for k, v in PEFT_SMALL.items() if k == method}},
    }


def run_config(backbone: str, method: str, run_id: str = "export-test") -> RunConfig:
    return config_from_dict(_config_dict(backbone, method, run_id))


def trained_state(method: PeftMethod, model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """The method's state, perturbed as training would (zero-initialised LoRA B and adapters included)."""
    gen = torch.Generator().manual_seed(seed)
    state = method.get_state(model)
    for name, value in state.items():
        if value.is_floating_point():
            noise = torch.randn(value.shape, generator=gen)
            state[name] = value * (1 + 0.1 * noise) + 0.05 * torch.randn(value.shape, generator=gen)
    return state


def write_run(run_dir: Path, cfg: RunConfig, round_idx: int = 3, seed: int = 1,
              fingerprint: str | None = None) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """A run directory as the server leaves it; returns the PyTorch model holding the saved state."""
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, run_dir / "config.yaml")
    torch.manual_seed(cfg.common_args.random_seed)
    method = build_method(cfg.peft_args)
    model = method.apply(build_backbone(cfg.model_args).model)
    manifest = method.manifest(model)
    state = trained_state(method, model, seed)
    method.set_state(model, state)
    save_checkpoint(run_dir, round_idx, state, manifest_json=manifest.to_json(), manifest_hash=manifest.hash,
                    fingerprint=fingerprint or fingerprint_backbone(model, manifest),
                    run_id=cfg.common_args.run_id)
    return model.eval(), state


def _applies(backbone: str, method: str) -> bool:
    cfg = run_config(backbone, method)
    try:
        build_method(cfg.peft_args).apply(build_backbone(cfg.model_args).model)
    except PeftMethodError:
        return False
    return True


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
@pytest.mark.parametrize("method", METHODS)
def test_export_matches_pytorch_for_every_method(tmp_path: Path, backbone: str, method: str) -> None:
    if backbone == "cnn" and method in ("adapter", "prompt", "lora") and not _applies(backbone, method):
        pytest.skip(f"method {method} does not apply to a CNN backbone")
    cfg = run_config(backbone, method)
    model, _state = write_run(tmp_path / "run", cfg)
    result = export_run(tmp_path / "run", tmp_path / "model.onnx", parity_samples=64, num_threads=1)
    assert result.parity.passed and result.parity.samples == 64
    # independent check: the file on disk against the model that holds the checkpoint's tensors
    x = parity_inputs((3, 32, 32), (0.5,), (0.5,), n=100, seed=7)
    got = open_session(tmp_path / "model.onnx", 1).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        ref = model(x).numpy()
    assert np.abs(got - ref).max() < 1e-3
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.99


def test_export_uses_checkpoint_tensors_not_fresh_init(tmp_path: Path) -> None:
    cfg = run_config("vit", "bias")
    model, _ = write_run(tmp_path / "run", cfg, seed=5)
    export_run(tmp_path / "run", tmp_path / "m.onnx", num_threads=1)
    fresh = build_method(cfg.peft_args).apply(build_backbone(cfg.model_args).model).eval()
    x = parity_inputs((3, 32, 32), (0.5,), (0.5,), n=8)
    got = open_session(tmp_path / "m.onnx", 1).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        assert np.abs(got - model(x).numpy()).max() < 1e-3
        assert np.abs(got - fresh(x).numpy()).max() > 1e-2


def _graph_shape(path: Path) -> tuple[Counter[str], int]:
    graph = onnx.load(str(path)).graph
    return Counter(n.op_type for n in graph.node), len(graph.initializer)


def test_lora_is_merged_into_the_weights(tmp_path: Path) -> None:
    """A merged LoRA graph has exactly the plain backbone's operators and weights (no extra B @ A matmuls)."""
    for method in ("head", "lora"):
        write_run(tmp_path / method, run_config("vit", method))
        export_run(tmp_path / method, tmp_path / f"{method}.onnx", num_threads=1)
    assert _graph_shape(tmp_path / "lora.onnx") == _graph_shape(tmp_path / "head.onnx")


def test_metadata_is_present_and_correct(tmp_path: Path) -> None:
    cfg = run_config("vit", "prompt", run_id="meta-run")
    model, _ = write_run(tmp_path / "run", cfg, round_idx=7)
    export_run(tmp_path / "run", tmp_path / "m.onnx", num_threads=1)
    meta = read_metadata(tmp_path / "m.onnx")
    method = build_method(cfg.peft_args)
    manifest = method.manifest(model)
    p = METADATA_PREFIX
    assert meta[p + "backbone"] == "vit_tiny_patch16_224"
    assert meta[p + "backbone_fingerprint"] == fingerprint_backbone(model, manifest)
    assert meta[p + "method"] == "prompt"
    assert meta[p + "manifest_hash"] == manifest.hash
    assert meta[p + "run_id"] == "meta-run"
    assert meta[p + "round"] == "7"
    assert meta[p + "num_classes"] == "10"
    assert json.loads(meta[p + "input_size"]) == [3, 32, 32]
    spec = build_backbone(cfg.model_args).data_config
    assert json.loads(meta[p + "mean"]) == pytest.approx(list(spec.mean))
    assert json.loads(meta[p + "std"]) == pytest.approx(list(spec.std))
    assert p + "class_names" not in meta  # the run wrote no class list


def test_the_run_class_names_travel_in_the_onnx_metadata(tmp_path: Path) -> None:
    write_run(tmp_path / "run", run_config("vit", "head"))
    names = [f"class-{i}" for i in range(10)]
    (tmp_path / "run" / "classes.json").write_text(json.dumps(names))  # as the server writes it
    export_run(tmp_path / "run", tmp_path / "m.onnx", num_threads=1)
    assert json.loads(read_metadata(tmp_path / "m.onnx")[METADATA_PREFIX + "class_names"]) == names


def test_export_of_an_earlier_round(tmp_path: Path) -> None:
    cfg = run_config("vit", "head")
    write_run(tmp_path / "run", cfg, round_idx=1, seed=1)
    write_run(tmp_path / "run", cfg, round_idx=2, seed=2)
    result = export_run(tmp_path / "run", tmp_path / "m.onnx", round_idx=1, num_threads=1)
    assert result.metadata[METADATA_PREFIX + "round"] == "1"


def test_manifest_mismatch_fails_clearly(tmp_path: Path) -> None:
    write_run(tmp_path / "run", run_config("vit", "bias"))
    dump_config(run_config("vit", "head"), tmp_path / "run" / "config.yaml")  # config no longer matches
    with pytest.raises(ExportError, match="manifest hash"):
        export_run(tmp_path / "run", tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_backbone_fingerprint_mismatch_fails_clearly(tmp_path: Path) -> None:
    write_run(tmp_path / "run", run_config("vit", "bias"), fingerprint="0" * 64)
    with pytest.raises(ExportError, match="fingerprint"):
        export_run(tmp_path / "run", tmp_path / "m.onnx")


def test_parity_failure_aborts_the_export(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_run(tmp_path / "run", run_config("vit", "bias"))

    def broken_merge(self: PeftMethod, model: torch.nn.Module) -> torch.nn.Module:
        import copy

        other = copy.deepcopy(model)
        with torch.no_grad():
            other.head.bias.add_(torch.linspace(-3, 3, 10))
        return other

    monkeypatch.setattr(PeftMethod, "export_model", broken_merge)
    with pytest.raises(ExportError, match="disagrees with PyTorch"):
        export_run(tmp_path / "run", tmp_path / "m.onnx", num_threads=1)
    assert not (tmp_path / "m.onnx").exists()


def test_missing_run_dir_and_config(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="config.yaml"):
        export_run(tmp_path, tmp_path / "m.onnx")


def _cli(monkeypatch: pytest.MonkeyPatch, argv: list[str]) -> int:
    # sys.argv is set to something unrelated: the umbrella parser must read the argv it is given
    monkeypatch.setattr("sys.argv", ["pytest"])
    return cli_main(argv)


def test_cli_export(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    write_run(tmp_path / "run", run_config("vit", "bias"))
    code = _cli(monkeypatch, ["export", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "m.onnx"),
                              "--threads", "1", "--parity-samples", "16", "--latency-runs", "3"])
    out = capsys.readouterr().out
    assert code == 0
    assert "top-1 agreement 100.00%" in out and "OK" in out and "latency" in out
    assert (tmp_path / "m.onnx").exists()
    code = _cli(monkeypatch, ["export", "--run", str(tmp_path / "nope"), "--out", str(tmp_path / "x.onnx")])
    assert code == 2
    assert "config.yaml" in capsys.readouterr().err


def test_evaluator_agrees_with_training_evaluate_on_real_data() -> None:
    """What an agent with eval_backend=onnxruntime reports equals the PyTorch evaluation of the same model."""
    data_args = {"image_size": 32, "max_test_samples": 48}
    cfg = config_from_dict({**_config_dict("vit", "lora"), "data_args": data_args})
    method = build_method(cfg.peft_args)
    backbone = build_backbone(cfg.model_args)
    model = method.apply(backbone.model)
    method.set_state(model, trained_state(method, model, seed=3))
    loader = build_server_test_loader(cfg.data_args, backbone.data_config, seed=0)
    onnx_eval = OnnxEvaluator(model, backbone.data_config, num_threads=1, method=method,
                              image_size=cfg.data_args.image_size)
    got, ref = onnx_eval.evaluate(loader), evaluate(model, loader, "cpu")
    assert got.samples == ref.samples == 48
    assert got.top1 == pytest.approx(ref.top1, abs=1 / 48 + 1e-9)
    assert got.loss == pytest.approx(ref.loss, abs=1e-3)
