"""The one training loop: determinism, steps/epochs, frozen BatchNorm, the privatizer hook, clipping, eval."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn

from fedpeft_edge.config import TrainArgs
from fedpeft_edge.errors import TrainingError
from fedpeft_edge.training import EvalResult, LocalTrainer, StepStats, build_optimizer, evaluate, resolve_device

ARGS = TrainArgs(learning_rate=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def small_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


def loader(n_batches: int = 4, size: int = 8, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Separable data: the label is which channel carries the signal."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        y = torch.randint(0, 3, (size,), generator=g)
        x = 0.1 * torch.randn(size, 3, 6, 6, generator=g)
        x[torch.arange(size), y] += 1.0
        out.append((x, y))
    return out


def test_training_is_deterministic_with_a_seed() -> None:
    results, weights = [], []
    for _ in range(2):
        model = small_net()
        trainer = LocalTrainer(model, ARGS, "cpu", loader(), seed=3)
        results.append(trainer.train(epochs=2))
        weights.append([p.detach().clone() for p in model.parameters()])
    assert results[0].loss == results[1].loss
    assert all(torch.equal(a, b) for a, b in zip(*weights, strict=True))


def test_epochs_and_max_steps() -> None:
    trainer = LocalTrainer(small_net(), ARGS, "cpu", loader(4))
    r = trainer.train(epochs=2)
    assert (r.steps, r.samples) == (8, 64)
    r = trainer.train(max_steps=10)  # cycles the 4-batch loader
    assert (r.steps, r.samples) == (10, 80)
    assert LocalTrainer(small_net(), TrainArgs(max_steps=3), "cpu", loader(4)).train().steps == 3
    assert LocalTrainer(small_net(), TrainArgs(epochs=1), "cpu", loader(4)).train().steps == 4


def test_it_learns() -> None:
    model = small_net()
    trainer = LocalTrainer(model, ARGS, "cpu", loader(8))
    before = evaluate(model, loader(4, seed=9), "cpu")
    r = trainer.train(epochs=10)
    after = evaluate(model, loader(4, seed=9), "cpu")
    assert after.loss < before.loss and after.top1 >= 0.9
    assert model.training  # evaluate restores the mode it found
    assert r.loss_end < r.loss  # the last quarter of the steps (20 of 80) learned more than the mean


def test_batchnorm_statistics_stay_frozen_while_its_affine_terms_train() -> None:
    model = small_net()
    bn = model[1]
    stats = (bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked))
    weight = bn.weight.detach().clone()
    LocalTrainer(model, ARGS, "cpu", loader()).train(epochs=1)
    assert torch.equal(bn.running_mean, stats[0]) and torch.equal(bn.running_var, stats[1])
    assert int(bn.num_batches_tracked) == stats[2]
    assert not torch.equal(bn.weight, weight)
    assert not bn.training and model[3].training  # BN in eval, dropout in train mode


def test_train_restores_the_modes_evaluation_or_the_caller_changed() -> None:
    model = small_net()
    trainer = LocalTrainer(model, ARGS, "cpu", loader())
    for change in (model.eval, lambda: evaluate(model, loader(1), "cpu"), lambda: model[3].eval(),
                   lambda: model[1].train()):
        change()
        trainer.train(max_steps=1)
        assert [m.training for m in model.modules()] == [True, True, False, True, True, True, True, True]


def test_optimizer_is_built_once_and_momentum_restarts_each_call() -> None:
    trainer = LocalTrainer(small_net(), ARGS, "cpu", loader())
    optimizer = trainer.optimizer
    trainer.train(max_steps=1)
    assert trainer.optimizer is optimizer and len(optimizer.state) > 0
    trainer._begin()
    assert len(optimizer.state) == 0
    keep = LocalTrainer(small_net(), ARGS, "cpu", loader(), keep_optimizer_state=True)
    keep.train(max_steps=1)
    keep._begin()
    assert len(keep.optimizer.state) > 0


def test_only_trainable_parameters_are_optimised() -> None:
    model = small_net()
    for p in model[0].parameters():
        p.requires_grad_(False)
    frozen = model[0].weight.detach().clone()
    trainer = LocalTrainer(model, ARGS, "cpu", loader())
    assert sum(len(g["params"]) for g in trainer.optimizer.param_groups) == 4
    trainer.train(epochs=1)
    assert torch.equal(model[0].weight, frozen)


def test_no_trainable_parameter_is_an_error() -> None:
    model = small_net().requires_grad_(False)
    with pytest.raises(TrainingError, match="no trainable parameter"):
        LocalTrainer(model, ARGS, "cpu", loader())


def test_adamw_and_plain_sgd() -> None:
    adamw = build_optimizer(small_net(), TrainArgs(client_optimizer="adamw"))
    assert isinstance(adamw, torch.optim.AdamW)
    sgd = build_optimizer(small_net(), TrainArgs(momentum=0.0, nesterov=True))
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["nesterov"] is False


def test_gradient_clipping_bounds_the_update() -> None:
    args = TrainArgs(learning_rate=1.0, momentum=0.0, nesterov=False, weight_decay=0.0, grad_clip_norm=0.01)
    model = small_net()
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    LocalTrainer(model, args, "cpu", loader()).train(max_steps=1)
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert 0 < float((after - before).norm()) <= 0.01 + 1e-6


def test_empty_batches_are_skipped_and_an_empty_loader_is_an_error() -> None:
    empty = (torch.zeros(0, 3, 6, 6), torch.zeros(0, dtype=torch.long))
    data = loader(2)
    r = LocalTrainer(small_net(), ARGS, "cpu", [empty, data[0], empty, data[1]]).train(epochs=1)
    assert (r.steps, r.samples) == (2, 16)
    with pytest.raises(TrainingError, match="no non-empty batch"):
        LocalTrainer(small_net(), ARGS, "cpu", [empty]).train(max_steps=5)


def test_a_nan_loss_stops_training() -> None:
    model = small_net()
    with torch.no_grad():
        model[6].weight.fill_(float("nan"))
    with pytest.raises(TrainingError, match="learning_rate"):
        LocalTrainer(model, ARGS, "cpu", loader()).train(max_steps=1)


class FakePrivatizer:
    """Stands in for fedpeft_edge.privacy: wraps the loader and counts steps through the optimizer."""

    def __init__(self) -> None:
        self.attached = 0
        self.steps = 0

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer, data: Any) -> tuple[Any, Any, Any]:
        self.attached += 1
        original_step = optimizer.step

        def step(*args: Any, **kwargs: Any) -> Any:
            self.steps += 1
            return original_step(*args, **kwargs)

        optimizer.step = step  # type: ignore[method-assign]
        return model, optimizer, list(data)[:1]

    def epsilon(self) -> float:
        return 0.0

    def detach(self) -> None:
        self.attached -= 1


def test_privatizer_attaches_once_and_its_loader_is_used() -> None:
    priv = FakePrivatizer()
    trainer = LocalTrainer(small_net(), ARGS, "cpu", loader(4), privatizer=priv)
    assert priv.attached == 1
    trainer.train(epochs=1)
    trainer.train(epochs=1)
    assert priv.attached == 1 and priv.steps == 2  # its loader holds one batch


def test_per_step_timing_reaches_the_caller() -> None:
    seen: list[StepStats] = []
    r = LocalTrainer(small_net(), ARGS, "cpu", loader(3), on_step=seen.append).train(epochs=1)
    assert [s.step for s in seen] == [1, 2, 3] and all(s.batch_size == 8 and s.compute_s > 0 for s in seen)
    assert r.compute_s == pytest.approx(sum(s.compute_s for s in seen))
    assert r.images_per_s == pytest.approx(24 / r.compute_s) and r.wall_s >= r.compute_s


def test_evaluate_counts_loss_and_top1() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        model[1].weight.copy_(torch.eye(2) * 10)
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([0, 1, 1, 1])
    r = evaluate(model, [(x[:2], y[:2]), (x[2:], y[2:])], "cpu")
    assert r.samples == 4 and r.top1 == 0.75
    assert r.loss == pytest.approx((3 * math.log1p(math.exp(-10)) + 10 + math.log1p(math.exp(-10))) / 4, rel=1e-5)
    empty = evaluate(model, [], "cpu")
    assert isinstance(empty, EvalResult) and empty.samples == 0 and math.isnan(empty.top1)


def test_train_needs_positive_work_and_known_devices() -> None:
    trainer = LocalTrainer(small_net(), ARGS, "cpu", loader())
    with pytest.raises(TrainingError, match="epochs > 0"):
        trainer.train(epochs=0)
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(TrainingError, match="CUDA is not available"):
            resolve_device("cuda")
    if not torch.backends.mps.is_available():
        with pytest.raises(TrainingError, match="no MPS backend"):
            resolve_device("mps")
