"""Per-sample gradients through eval-mode BatchNorm equal a one-sample-at-a-time loop, for both engines."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedpeft_edge.backbone import create_timm_model
from fedpeft_edge.config import PeftArgs
from fedpeft_edge.errors import PrivacyError
from fedpeft_edge.peft.registry import build_method
from fedpeft_edge.privacy.grad_sample import choose_mode, make_grad_sampler
from fedpeft_edge.training import set_batchnorm_eval

N = 4


def _cnn(method: str) -> nn.Module:
    torch.manual_seed(0)
    model = create_timm_model("test_efficientnet", 5)
    model.train()
    with torch.no_grad():  # running statistics away from (0, 1), so normalisation matters
        model(torch.randn(8, 3, 32, 32) * 3 + 1)
    model = build_method(PeftArgs(method=method)).apply(model)  # type: ignore[arg-type]
    model.train()
    set_batchnorm_eval(model)
    return model


def _loop_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    out = []
    for i in range(x.shape[0]):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        out.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    model.zero_grad()
    return out


@pytest.mark.parametrize("mode", ["hooks", "functorch"])
@pytest.mark.parametrize("method", ["bias", "full"])
def test_cnn_per_sample_gradients_equal_a_one_sample_loop(method: str, mode: str) -> None:
    model = _cnn(method)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(N, 3, 32, 32, generator=g), torch.randint(0, 5, (N,), generator=g)
    expected = _loop_gradients(model, x, y)
    sampler = make_grad_sampler(model, mode)  # type: ignore[arg-type]
    try:
        nn.functional.cross_entropy(model(x), y).backward()
        trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        bn = [n for n, _ in trained if ".bn" in n]
        assert bn, "the CNN method should train BatchNorm affine terms"
        for name, p in trained:
            assert p.grad_sample.shape == (N, *p.shape), name
            for i in range(N):
                torch.testing.assert_close(p.grad_sample[i], expected[i][name], rtol=1e-4, atol=1e-6)
    finally:
        sampler.cleanup()


def test_auto_mode_keeps_opacus_hooks_for_a_cnn_with_batchnorm() -> None:
    assert choose_mode(_cnn("bias"), "auto") == "hooks"


def test_hooks_restore_inplace_activations_on_cleanup() -> None:
    model = _cnn("bias")
    inplace = [m for m in model.modules() if getattr(m, "inplace", None) is True]
    assert inplace
    sampler = make_grad_sampler(model, "hooks")
    assert not any(m.inplace for m in inplace)
    sampler.cleanup()
    assert all(m.inplace for m in inplace)


def test_batchnorm_in_train_mode_has_no_per_sample_gradient() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
    model[0].requires_grad_(False)
    sampler = make_grad_sampler(model, "hooks")
    try:
        model.train()  # BatchNorm in train mode: batch statistics mix the samples
        loss = nn.functional.cross_entropy(model(torch.randn(3, 1, 6, 6)), torch.tensor([0, 1, 2]))
        with pytest.raises(PrivacyError, match="batch statistics"):
            loss.backward()
    finally:
        sampler.cleanup()
