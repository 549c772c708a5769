"""DP-SGD through THE training loop for every PEFT method on a tiny ViT, and on a CNN with frozen BatchNorm."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from fedpeft_edge.backbone import build_backbone
from fedpeft_edge.config import DpArgs, ModelArgs, PeftArgs, TrainArgs
from fedpeft_edge.peft.registry import build_method
from fedpeft_edge.privacy import build_privatizer
from fedpeft_edge.privacy.grad_sample import choose_mode
from fedpeft_edge.training import LocalTrainer

TINY_VIT = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
N, BATCH = 24, 6


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _data(size: int = 32) -> DataLoader[tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(N, 3, size, size, generator=g), torch.randint(0, 5, (N,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=True)


def _train_dp(model_args: ModelArgs, method_name: str, tmp_path: Path,
              noise: float = 0.5) -> tuple[dict[str, torch.Tensor], ...]:
    torch.manual_seed(0)
    model = build_backbone(model_args).model
    method = build_method(PeftArgs(method=method_name))  # type: ignore[arg-type]
    model = method.apply(model)
    before = method.get_state(model)
    priv = build_privatizer(DpArgs(enabled=True, noise_multiplier=noise, max_grad_norm=1.0),
                            sample_size=N, batch_size=BATCH, epochs_per_round=1, planned_rounds=2,
                            ledger_path=tmp_path / "ledger.json")
    assert priv is not None
    args = TrainArgs(learning_rate=0.05, momentum=0.0, weight_decay=0.0, epochs=1)
    trainer = LocalTrainer(model, args, "cpu", _data(), privatizer=priv, seed=0)
    result = trainer.train(max_steps=3)
    assert result.steps == 3
    assert priv.ledger.steps >= 3 and priv.epsilon() > 0
    return before, method.get_state(model)


@pytest.mark.parametrize("method_name", ["full", "bias", "adapter", "prompt", "lora", "head"])
def test_every_method_trains_under_dp_and_every_shared_tensor_moves(method_name: str, tmp_path: Path) -> None:
    vit = ModelArgs(model="vit_tiny_patch16_224", num_classes=5, weights="none", model_kwargs=TINY_VIT)
    before, after = _train_dp(vit, method_name, tmp_path)
    assert before.keys() == after.keys() and len(after) > 0
    for name, tensor in after.items():
        assert torch.isfinite(tensor).all(), name
        # every shared tensor must move: guards the opacus + peft failure where LoRA weights stop training
        assert not torch.equal(tensor, before[name]), f"{method_name}: {name} did not change under DP-SGD"


@pytest.mark.parametrize("method_name", ["lora", "prompt"])
def test_without_noise_the_gradient_alone_moves_every_tensor(method_name: str, tmp_path: Path) -> None:
    # noise would move a tensor whose gradient never arrives; with noise 0 only real gradient signal can
    vit = ModelArgs(model="vit_tiny_patch16_224", num_classes=5, weights="none", model_kwargs=TINY_VIT)
    before, after = _train_dp(vit, method_name, tmp_path, noise=0.0)
    moved = {name: not torch.equal(after[name], before[name]) for name in after}
    assert all(moved.values()), [name for name, ok in moved.items() if not ok]


def test_auto_mode_uses_opacus_hooks_for_layers_and_torch_func_for_prompt_tokens() -> None:
    vit = ModelArgs(model="vit_tiny_patch16_224", num_classes=5, weights="none", model_kwargs=TINY_VIT)
    modes = {}
    for name in ("lora", "prompt"):
        model = build_method(PeftArgs(method=name)).apply(build_backbone(vit).model)  # type: ignore[arg-type]
        modes[name] = choose_mode(model, "auto")
    assert modes == {"lora": "hooks", "prompt": "functorch"}


CNN = ModelArgs(model="test_efficientnet", num_classes=5, weights="none")


@pytest.mark.parametrize("method_name", ["bias", "full"])
def test_cnn_methods_training_frozen_batchnorm_affine_terms_train_under_dp(method_name: str,
                                                                          tmp_path: Path) -> None:
    before, after = _train_dp(CNN, method_name, tmp_path)
    bn = [k for k in after if ".bn" in k]
    assert bn, "the method should train BatchNorm affine terms on this CNN"
    moved = [k for k in after if not torch.equal(after[k], before[k])]
    assert set(bn) <= set(moved)
    assert all(torch.isfinite(t).all() for t in after.values())


def test_cnn_head_under_dp_keeps_batchnorm_frozen_and_trains(tmp_path: Path) -> None:
    before, after = _train_dp(CNN, "head", tmp_path)
    assert all(not torch.equal(after[k], before[k]) for k in after)
