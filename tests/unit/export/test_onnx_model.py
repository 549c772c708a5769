"""ONNX export, metadata, parity, evaluator and latency on tiny timm models (no run directory needed)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import timm
import torch
from torch import nn

from fedpeft_edge.errors import ExportError
from fedpeft_edge.export import (
    OnnxEvaluator,
    check_parity,
    export_onnx,
    measure_latency,
    open_session,
    parity_inputs,
    read_metadata,
    require_parity,
    set_metadata,
)

torch.set_num_threads(1)


@dataclasses.dataclass(frozen=True)
class Spec:
    input_size: tuple[int, int, int]
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.25, 0.25, 0.25)


def tiny_vit() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32,
                             patch_size=8, embed_dim=32, depth=2, num_heads=2).eval()


def tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    # pad_type "same" exercises the TF-style dynamic padding of the tf_efficientnet_* demo backbones
    return timm.create_model("test_efficientnet", pretrained=False, num_classes=10, pad_type="same").eval()


MODELS = {"vit": (tiny_vit, 32), "cnn": (tiny_cnn, 32)}


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_export_has_dynamic_batch_and_matches_torch(kind: str) -> None:
    build, size = MODELS[kind]
    model = build()
    data = export_onnx(model, (3, size, size))
    session = open_session(data, num_threads=1)
    for batch in (1, 5):
        x = torch.randn(batch, 3, size, size)
        got = session.run(None, {"input": x.numpy()})[0]
        with torch.no_grad():
            ref = model(x).numpy()
        assert got.shape == (batch, 10)
        assert np.abs(got - ref).max() < 1e-4


def test_export_restores_training_mode() -> None:
    model = tiny_vit().train()
    export_onnx(model, (3, 32, 32))
    assert model.training


def test_export_rejects_bad_input_size() -> None:
    with pytest.raises(ExportError, match="input_size"):
        export_onnx(tiny_vit(), (32, 32))


def test_metadata_round_trip_and_replace() -> None:
    data = export_onnx(tiny_vit(), (3, 32, 32), {"fedpeft.method": "bias", "fedpeft.round": "3"})
    data = set_metadata(data, {"fedpeft.round": "4"})
    meta = read_metadata(data)
    assert meta["fedpeft.method"] == "bias"
    assert meta["fedpeft.round"] == "4"


def test_read_metadata_of_garbage_fails_clearly() -> None:
    with pytest.raises(ExportError, match="cannot read ONNX"):
        read_metadata(b"not an onnx file")


def test_parity_inputs_are_real_normalised_images() -> None:
    x = parity_inputs((3, 16, 16), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), n=10)
    assert x.shape == (10, 3, 16, 16)
    assert torch.isfinite(x).all()
    assert x.min() >= (0 - 0.5) / 0.25 - 1e-5 and x.max() <= (1 - 0.5) / 0.25 + 1e-5
    assert x.std() > 0.1  # digits, not constants


def test_parity_passes_for_faithful_export() -> None:
    model = tiny_cnn()
    session = open_session(export_onnx(model, (3, 32, 32)), 1)
    result = check_parity(model, session, parity_inputs((3, 32, 32), (0.5,), (0.25,), n=40))
    assert result.passed, result.describe()
    assert result.top1_agreement >= 0.99 and result.max_abs_diff < 1e-3
    require_parity(result)


def test_parity_fails_when_model_changed_after_export() -> None:
    model = tiny_vit()
    session = open_session(export_onnx(model, (3, 32, 32)), 1)
    with torch.no_grad():
        model.head.bias.add_(torch.linspace(-1.0, 1.0, 10))
    result = check_parity(model, session, parity_inputs((3, 32, 32), (0.5,), (0.25,), n=20))
    assert not result.passed
    with pytest.raises(ExportError, match="disagrees with PyTorch"):
        require_parity(result)


def test_evaluator_matches_torch_and_follows_refresh() -> None:
    model = tiny_vit()
    spec = Spec((3, 32, 32))
    evaluator = OnnxEvaluator(model, spec, num_threads=1)
    x = parity_inputs(spec.input_size, spec.mean, spec.std, n=24)
    y = torch.arange(24) % 10
    loader = [(x[:16], y[:16]), (x[16:], y[16:])]
    with torch.no_grad():
        logits = model(x)
    res = evaluator.evaluate(loader)
    assert res.samples == 24
    assert res.loss == pytest.approx(float(nn.functional.cross_entropy(logits, y)), abs=1e-4)
    assert res.top1 == pytest.approx(float((logits.argmax(1) == y).float().mean()))
    with torch.no_grad():
        model.head.bias.copy_(torch.zeros(10))
        model.head.bias[3] = 100.0  # now every input is class 3
    evaluator.refresh(model)
    assert evaluator.evaluate(loader).top1 == pytest.approx(float((y == 3).float().mean()))


class _Hook:
    """A stand-in for PeftMethod.export_model: replaces the model by one that always predicts class 7."""

    def export_model(self, model: nn.Module) -> nn.Module:
        head = nn.Linear(3 * 8 * 8, 10)
        with torch.no_grad():
            head.weight.zero_()
            head.bias.copy_(torch.nn.functional.one_hot(torch.tensor(7), 10).float())
        return nn.Sequential(nn.Flatten(), head)


def test_evaluator_uses_method_export_hook() -> None:
    evaluator = OnnxEvaluator(tiny_cnn(), Spec((3, 8, 8)), num_threads=1, method=_Hook())
    res = evaluator.evaluate([(torch.randn(4, 3, 8, 8), torch.full((4,), 7))])
    assert res.top1 == 1.0


def test_measure_latency_reports_median_and_p90() -> None:
    session = open_session(export_onnx(tiny_vit(), (3, 32, 32)), 1)
    lat = measure_latency(session, (3, 32, 32), runs=7, warmup=1)
    assert lat["runs"] == 7
    assert 0 < lat["median_ms"] <= lat["p90_ms"]


def test_measure_latency_from_path(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "m.onnx"
    path.write_bytes(export_onnx(tiny_vit(), (3, 32, 32)))
    assert measure_latency(path, (1, 3, 32, 32), runs=3, warmup=0, num_threads=1)["runs"] == 3
    with pytest.raises(ExportError, match="runs"):
        measure_latency(path, (3, 32, 32), runs=0)


def test_evaluator_follows_data_image_size_and_rejects_other_shapes() -> None:
    evaluator = OnnxEvaluator(tiny_cnn(), Spec((3, 160, 160)), num_threads=1, image_size=24)
    assert evaluator.input_size == (3, 24, 24)
    assert evaluator.evaluate([(torch.randn(2, 3, 24, 24), torch.tensor([0, 1]))]).samples == 2
    with pytest.raises(ExportError, match="image_size"):
        evaluator.evaluate([(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))])
    lat = evaluator.latency(runs=3, warmup=0)
    assert lat["runs"] == 3 and lat["median_ms"] > 0
