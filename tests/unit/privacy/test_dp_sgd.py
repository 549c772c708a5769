"""DP-SGD mechanics: per-sample clipping before noise, noise scale, BatchNorm rules, empty Poisson batches."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedpeft_edge.config import DpArgs
from fedpeft_edge.errors import PrivacyError
from fedpeft_edge.privacy import DpPrivatizer, build_privatizer


def _privatizer(tmp_path: Path, n: int, batch: int, noise: float = 0.0, clip: float = 1.0) -> DpPrivatizer:
    args = DpArgs(enabled=True, noise_multiplier=noise, max_grad_norm=clip)
    priv = build_privatizer(args, sample_size=n, batch_size=batch, epochs_per_round=1, planned_rounds=1,
                            ledger_path=tmp_path / "ledger.json")
    assert priv is not None
    return priv


def _loader(x: torch.Tensor, y: torch.Tensor, batch: int) -> DataLoader[tuple[torch.Tensor, ...]]:
    return DataLoader(TensorDataset(x, y), batch_size=batch)


def _step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


def test_each_per_sample_gradient_is_clipped_to_max_grad_norm_before_noise(tmp_path: Path) -> None:
    torch.manual_seed(0)
    clip, n = 0.5, 8
    model = nn.Linear(6, 3)
    x, y = torch.randn(n, 6) * 20.0, torch.randint(0, 3, (n,))  # large inputs: raw norms far above clip
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    priv = _privatizer(tmp_path, n, n, noise=0.0, clip=clip)
    model, dp_opt, _ = priv.attach(model, opt, _loader(x, y, n))

    raw, clipped = [], []
    for i in range(n):  # one sample per DP step: the update IS that sample's clipped gradient (scaled)
        before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
        dp_opt.zero_grad()
        nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        raw.append(float(torch.cat([p.grad_sample.flatten() for p in model.parameters()]).norm()))
        dp_opt.step()
        after = torch.cat([p.detach().flatten() for p in model.parameters()])
        clipped.append(float((before - after).norm()) * dp_opt.expected_batch_size)
    assert max(raw) > 4 * clip, raw  # the test would be vacuous without gradients above the bound
    for r, c in zip(raw, clipped, strict=True):
        assert c == pytest.approx(min(r, clip), rel=1e-3, abs=1e-6)


def test_batch_update_is_the_mean_of_clipped_per_sample_gradients(tmp_path: Path) -> None:
    torch.manual_seed(1)
    clip, n = 1.0, 16
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4))
    x, y = torch.randn(n, 5) * 10.0, torch.randint(0, 4, (n,))
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    model, dp_opt, _ = _privatizer(tmp_path, n, n, noise=0.0, clip=clip).attach(model, opt, _loader(x, y, n))
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    dp_opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    per_sample = torch.cat([p.grad_sample.reshape(n, -1) for p in params], dim=1)
    norms = per_sample.norm(dim=1)
    assert (norms > clip).sum() >= n // 2
    expected = (per_sample * (clip / (norms + 1e-6)).clamp(max=1.0)[:, None]).sum(0) / n
    dp_opt.step()
    update = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, params, strict=True)])
    torch.testing.assert_close(update, expected, rtol=1e-4, atol=1e-6)
    unclipped = per_sample.sum(0) / n
    assert not torch.allclose(update, unclipped, rtol=1e-2)


def test_noise_std_of_the_update_is_noise_multiplier_times_clip_over_batch(tmp_path: Path) -> None:
    torch.manual_seed(2)
    noise, clip, batch, n = 1.3, 0.7, 8, 80
    model = nn.Linear(64, 256, bias=False)
    x, y = torch.zeros(n, 64), torch.randint(0, 256, (n,))  # zero inputs: the true gradient is exactly 0
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    priv = _privatizer(tmp_path, n, batch, noise=noise, clip=clip)
    model, dp_opt, _ = priv.attach(model, opt, _loader(x, y, batch))
    before = model.weight.detach().clone()
    _step(model, dp_opt, x[:batch], y[:batch])
    update = (before - model.weight.detach()).flatten()
    expected = noise * clip / batch
    # 16384 draws: the sample std is within ~0.6 % of the truth at one sigma; 4 % is ~7 sigma
    assert float(update.std()) == pytest.approx(expected, rel=0.04)
    assert abs(float(update.mean())) < 4 * expected / math.sqrt(update.numel())


def test_trainable_batchnorm_in_eval_mode_trains_and_in_train_mode_is_refused(tmp_path: Path) -> None:
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
    for p in model.parameters():
        p.requires_grad_(False)
    model[1].bias.requires_grad_(True)  # CNN bias tuning trains BatchNorm's bias
    x, y = torch.randn(10, 1, 6, 6), torch.randint(0, 3, (10,))
    opt = torch.optim.SGD([model[1].bias], lr=0.1)
    model, dp_opt, _ = _privatizer(tmp_path, 10, 5, noise=1.0).attach(model, opt, _loader(x, y, 5))
    model.train()
    model[1].eval()
    before = model[1].bias.detach().clone()
    _step(model, dp_opt, x[:5], y[:5])
    assert not torch.equal(before, model[1].bias)
    model[1].train()
    with pytest.raises(PrivacyError, match="eval mode"):
        model(x[:5])


def test_batchnorm_without_running_statistics_is_refused(tmp_path: Path) -> None:
    # eval mode without running statistics still normalises with the batch's own: samples would mix
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2, track_running_stats=False), nn.Flatten(),
                          nn.Linear(2 * 4 * 4, 3))
    x, y = torch.randn(10, 1, 6, 6), torch.randint(0, 3, (10,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, _, _ = _privatizer(tmp_path, 10, 5).attach(model, opt, _loader(x, y, 5))
    model.eval()
    with pytest.raises(PrivacyError, match="running statistics"):
        model(x[:5])


def test_frozen_batchnorm_in_eval_mode_trains_and_train_mode_is_refused(tmp_path: Path) -> None:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
    for p in model[:2].parameters():
        p.requires_grad_(False)
    x, y = torch.randn(10, 1, 6, 6), torch.randint(0, 3, (10,))
    opt = torch.optim.SGD(model[3].parameters(), lr=0.1)
    model, dp_opt, _ = _privatizer(tmp_path, 10, 5, noise=1.0).attach(model, opt, _loader(x, y, 5))
    model.train()
    model[1].eval()
    before = model[3].weight.detach().clone()
    _step(model, dp_opt, x[:5], y[:5])
    assert not torch.equal(before, model[3].weight)
    model[1].train()
    with pytest.raises(PrivacyError, match="eval mode"):
        model(x[:5])


def test_optimizer_over_a_foreign_tensor_is_refused(tmp_path: Path) -> None:
    model = nn.Linear(3, 2)
    stray = nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([*model.parameters(), stray], lr=0.1)
    x, y = torch.randn(4, 3), torch.randint(0, 2, (4,))
    with pytest.raises(PrivacyError, match="escape per-sample clipping"):
        _privatizer(tmp_path, 4, 2).attach(model, opt, _loader(x, y, 2))


def test_loader_size_must_match_the_planned_sample_size(tmp_path: Path) -> None:
    model = nn.Linear(3, 2)
    x, y = torch.randn(12, 3), torch.randint(0, 2, (12,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(PrivacyError, match="sample_size"):
        _privatizer(tmp_path, 40, 4).attach(model, opt, _loader(x, y, 4))


def test_a_loader_that_cannot_be_poisson_sampled_is_refused(tmp_path: Path) -> None:
    model = nn.Linear(3, 2)
    batches = [(torch.randn(4, 3), torch.randint(0, 2, (4,)))]
    with pytest.raises(PrivacyError, match="DataLoader"):
        _privatizer(tmp_path, 4, 2).attach(model, torch.optim.SGD(model.parameters(), lr=0.1), batches)  # type: ignore[arg-type]


class _Prompted(nn.Module):
    """A plain nn.Parameter outside any standard layer (as in prompt tuning): opacus needs functorch."""

    def __init__(self) -> None:
        super().__init__()
        self.prompt = nn.Parameter(torch.zeros(4))
        self.body = nn.Linear(4, 3)
        self.body.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(torch.tanh(x + self.prompt))


def test_poisson_loader_charges_every_draw_and_turns_empty_ones_into_noise_steps(tmp_path: Path) -> None:
    torch.manual_seed(4)
    n = 20
    model = _Prompted()
    x, y = torch.randn(n, 4), torch.randint(0, 3, (n,))
    opt = torch.optim.SGD([model.prompt], lr=0.1)
    priv = _privatizer(tmp_path, n, 2, noise=1.0)
    model, dp_opt, loader = priv.attach(model, opt, _loader(x, y, 2))
    sizes = []
    for _ in range(5):
        for xb, yb in loader:
            sizes.append(len(xb))
            before = model.prompt.detach().clone()
            _step(model, dp_opt, xb, yb)
            assert torch.isfinite(model.prompt).all() and not torch.equal(before, model.prompt)
    assert min(sizes) > 0 and len(set(sizes)) > 1  # Poisson: variable sizes; the loop never sees empty ones
    assert priv.ledger.steps == 5 * len(loader) > len(sizes)  # empty draws (q = 0.1, n = 20) were charged


@pytest.mark.parametrize("mode", ["hooks", "functorch"])
def test_an_empty_batch_through_either_engine_is_a_finite_noise_step(tmp_path: Path, mode: str) -> None:
    torch.manual_seed(5)
    model = nn.Linear(4, 3)
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    priv = build_privatizer(DpArgs(enabled=True, noise_multiplier=1.0), sample_size=10, batch_size=2,
                            epochs_per_round=1, planned_rounds=1, ledger_path=None,
                            grad_sample_mode=mode)  # type: ignore[arg-type]
    assert priv is not None
    model, dp_opt, _ = priv.attach(model, torch.optim.SGD(model.parameters(), lr=0.1), _loader(x, y, 2))
    before = model.weight.detach().clone()
    dp_opt.zero_grad()
    nn.functional.cross_entropy(model(x[:0]), y[:0]).backward()
    dp_opt.step()
    assert torch.isfinite(model.weight).all() and not torch.equal(before, model.weight)
    assert priv.ledger.steps == 1


@pytest.mark.parametrize("mode", ["hooks", "functorch"])
def test_both_engines_give_the_same_per_sample_gradients(tmp_path: Path, mode: str) -> None:
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6), nn.Linear(6, 3))
    model[0].requires_grad_(False)
    x, y = torch.randn(7, 5), torch.randint(0, 3, (7,))
    reference = []
    for i in range(7):  # plain autograd, one sample at a time
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        reference.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad]))
    priv = build_privatizer(DpArgs(enabled=True, noise_multiplier=1.0), sample_size=7, batch_size=7,
                            epochs_per_round=1, planned_rounds=1, ledger_path=None,
                            grad_sample_mode=mode)  # type: ignore[arg-type]
    assert priv is not None
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model, dp_opt, _ = priv.attach(model, opt, _loader(x, y, 7))
    dp_opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    got = torch.cat([p.grad_sample.reshape(7, -1) for p in model.parameters() if p.requires_grad], dim=1)
    torch.testing.assert_close(got, torch.stack(reference), rtol=1e-4, atol=1e-5)
    assert all(getattr(p, "grad_sample", None) is None for p in model[0].parameters())  # frozen: none
