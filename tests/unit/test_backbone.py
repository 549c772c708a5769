"""Backbones: local-only weights, the EfficientNet-Lite0 package mapping, and the frozen-backbone fingerprint."""

from __future__ import annotations

import dataclasses
import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fedpeft_edge.backbone import (
    PACKAGE_WEIGHTS,
    _package_state,
    build_backbone,
    canonical_name,
    fingerprint_backbone,
    named_tensors,
)
from fedpeft_edge.config import ModelArgs
from fedpeft_edge.errors import BackboneError

TINY_VIT = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def tiny_vit(num_classes: int = 5, weights: str = "none", path: str | None = None) -> nn.Module:
    args = ModelArgs(model="vit_tiny_patch16_224", num_classes=num_classes, weights=weights,  # type: ignore[arg-type]
                     checkpoint_path=path, model_kwargs=TINY_VIT)
    return build_backbone(args).model


def lite0(num_classes: int = 10, model: str = "tf_efficientnet_lite0") -> nn.Module:
    return build_backbone(ModelArgs(model=model, num_classes=num_classes)).model.eval()


@pytest.mark.parametrize("model", ["tf_efficientnet_lite0", "efficientnet_lite0"])
def test_package_weights_match_every_tensor_in_order(model: str) -> None:
    net = lite0(1000, model)
    theirs = [v for k, v in _package_state().items() if not k.endswith("num_batches_tracked")]
    ours = [v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")]
    assert len(theirs) == len(ours) == 247
    assert all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(theirs, ours, strict=True))


def test_package_weights_keep_a_new_head_for_other_class_counts() -> None:
    torch.manual_seed(0)
    net = lite0(10)
    theirs = [v for k, v in _package_state().items() if not k.endswith("num_batches_tracked")]
    ours = [v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")]
    assert all(torch.equal(a, b) for a, b in zip(theirs[:-2], ours[:-2], strict=True))
    assert net.get_classifier().weight.shape == (10, 1280)


def _flower(size: int = 224) -> torch.Tensor:
    from PIL import Image
    from sklearn.datasets import load_sample_image

    img = load_sample_image("flower.jpg")  # 427 x 640 x 3, bundled with scikit-learn
    h, w = img.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    crop = Image.fromarray(img[top:top + side, left:left + side]).resize((size, size), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(crop, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return x.unsqueeze(0)


def test_package_weights_classify_the_sample_flower_as_daisy() -> None:
    backbone = build_backbone(ModelArgs(model="tf_efficientnet_lite0", num_classes=1000))
    spec = backbone.data_config
    assert spec.mean == spec.std == (0.5, 0.5, 0.5) and spec.input_size == (3, 224, 224)
    x = (_flower() - torch.tensor(spec.mean).view(1, 3, 1, 1)) / torch.tensor(spec.std).view(1, 3, 1, 1)
    with torch.no_grad():
        logits = backbone.model.eval()(x)
    assert int(logits.argmax()) == 985  # ImageNet 'daisy'


FASHION = Path("/usr/share/datasets/fashion-mnist")


def _fashion(n: int) -> tuple[np.ndarray, np.ndarray]:
    def read(name: str) -> np.ndarray:
        with gzip.open(FASHION / name) as f:
            raw = f.read()
        dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(raw[3])]
        return np.frombuffer(raw, np.uint8, offset=4 + 4 * raw[3]).reshape(dims)

    return read("train-images-idx3-ubyte.gz")[:n], read("train-labels-idx1-ubyte.gz")[:n]


def _probe(model: nn.Module, images: np.ndarray, labels: np.ndarray, n_train: int) -> float:
    """Top-1 of a logistic-regression probe on frozen pooled features (48 px, 3 channels, mean=std=0.5)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    x = torch.tensor(images, dtype=torch.float32) / 255.0
    x = nn.functional.interpolate(x.unsqueeze(1), size=(48, 48), mode="bilinear").repeat(1, 3, 1, 1)
    with torch.no_grad():
        feats = model.eval().forward_head(model.forward_features((x - 0.5) / 0.5), pre_logits=True).numpy()
    scaler = StandardScaler().fit(feats[:n_train])
    clf = LogisticRegression(max_iter=500, C=0.05).fit(scaler.transform(feats[:n_train]), labels[:n_train])
    return float(clf.score(scaler.transform(feats[n_train:]), labels[n_train:]))


@pytest.mark.skipif(not FASHION.is_dir(), reason="Fashion-MNIST IDX files not installed")
def test_pretrained_features_beat_random_ones_in_a_linear_probe() -> None:
    # Digits (8x8 upsampled) do not separate the two at a few hundred images (random conv features are
    # strong there; benchmarks/bench_probe.py shows +8 points only at 1000 training digits), so the quick
    # probe uses 600 Fashion-MNIST images: measured 0.795 pretrained vs 0.695 random init.
    images, labels = _fashion(600)
    torch.manual_seed(0)
    pretrained = _probe(lite0(10), images, labels, 400)
    random_init = _probe(build_backbone(ModelArgs(model="tf_efficientnet_lite0", weights="none")).model,
                         images, labels, 400)
    assert pretrained > 0.75
    assert pretrained - random_init > 0.05


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_a_local_checkpoint_loads_and_a_head_of_another_size_is_replaced(tmp_path: Path, suffix: str) -> None:
    torch.manual_seed(1)
    source = tiny_vit(num_classes=7)
    path = tmp_path / f"vit{suffix}"
    if suffix == ".pth":
        torch.save({"state_dict": source.state_dict()}, path)
    else:
        from safetensors.torch import save_file

        save_file(source.state_dict(), str(path))
    torch.manual_seed(2)
    loaded = tiny_vit(num_classes=5, weights="file", path=str(path))
    src, dst = source.state_dict(), loaded.state_dict()
    assert all(torch.equal(src[k], dst[k]) for k in dst if not k.startswith("head."))
    assert dst["head.weight"].shape == (5, 32)


def test_a_checkpoint_of_another_architecture_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(3, 3)}, path)
    with pytest.raises(BackboneError, match="does not match timm model keys"):
        tiny_vit(weights="file", path=str(path))


def test_a_missing_checkpoint_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(BackboneError, match="is not a file"):
        tiny_vit(weights="file", path=str(tmp_path / "absent.pth"))


@pytest.mark.parametrize("weights", ["imagenet", "hub", "pretrained"])
def test_hub_weights_are_refused_with_how_to_pass_a_file(weights: str) -> None:
    with pytest.raises(BackboneError, match=r"weights='file'.*checkpoint_path"):
        tiny_vit(weights=weights)


def test_hub_kwargs_and_urls_are_refused() -> None:
    with pytest.raises(BackboneError, match="nothing is downloaded"):
        build_backbone(ModelArgs(model="resnet10t", weights="none", model_kwargs={"pretrained": True}))
    with pytest.raises(BackboneError, match="hub or URL"):
        tiny_vit(weights="file", path="hf-hub:timm/vit_tiny_patch16_224.augreg_in21k")


def test_package_weights_on_another_model_are_refused() -> None:
    with pytest.raises(BackboneError, match="tf_efficientnet_lite0"):
        build_backbone(ModelArgs(model="resnet10t", weights=PACKAGE_WEIGHTS))


def test_unknown_model_is_refused() -> None:
    with pytest.raises(BackboneError, match="unknown timm model"):
        build_backbone(ModelArgs(model="no_such_model", weights="none"))


def test_data_config_follows_img_size() -> None:
    args = ModelArgs(model="vit_tiny_patch16_224", weights="none", model_kwargs=TINY_VIT)
    assert build_backbone(args).data_config.input_size == (3, 32, 32)


class _Named:
    def __init__(self, names: tuple[str, ...]) -> None:
        self.names = names


def test_fingerprint_is_stable_and_sees_one_changed_frozen_value() -> None:
    torch.manual_seed(0)
    a = tiny_vit()
    torch.manual_seed(0)
    b = tiny_vit()
    shared = _Named(("head.weight", "head.bias"))
    assert fingerprint_backbone(a, shared) == fingerprint_backbone(b, shared)
    with torch.no_grad():
        b.head.weight.add_(1.0)  # a shared tensor: not part of the frozen backbone
    assert fingerprint_backbone(a, shared) == fingerprint_backbone(b, shared)
    with torch.no_grad():
        flat = b.blocks[0].attn.qkv.weight.view(-1)
        flat[0] = torch.nextafter(flat[0], torch.tensor(float("inf")))  # one ulp
    assert fingerprint_backbone(a, shared) != fingerprint_backbone(b, shared)
    assert fingerprint_backbone(a) != fingerprint_backbone(a, shared)


def test_fingerprint_covers_buffers() -> None:
    net = lite0(10)
    before = fingerprint_backbone(net)
    with torch.no_grad():
        net.bn1.running_mean.add_(1e-3)
    assert fingerprint_backbone(net) != before


def test_canonical_names_strip_wrappers() -> None:
    assert canonical_name("_module.blocks.0.attn.qkv.base_layer.weight") == "blocks.0.attn.qkv.weight"
    assert canonical_name("blocks.0.attn.qkv.lora_A.default.weight") == "blocks.0.attn.qkv.lora_A.weight"
    assert canonical_name("head.weight") == "head.weight"
    assert "head.weight" in named_tensors(tiny_vit())


def test_a_fixed_size_model_fed_another_image_size_is_a_config_error() -> None:
    from fedpeft_edge.backbone import check_input_size
    from fedpeft_edge.errors import ConfigError

    vit = ModelArgs(model="vit_tiny_patch16_224", weights="none")
    with pytest.raises(ConfigError, match=r"image_size is 64 .* fixed input of 224 px: set data_args.image_size: 224"):
        check_input_size(vit, 64)
    check_input_size(vit, 224)
    check_input_size(vit, None)  # the model's own size
    check_input_size(dataclasses.replace(vit, model_kwargs={"img_size": 64}), 64)
    check_input_size(dataclasses.replace(vit, model_kwargs={"dynamic_img_size": True}), 64)
    check_input_size(ModelArgs(model="resnet18", weights="none"), 64)  # a CNN takes any size
