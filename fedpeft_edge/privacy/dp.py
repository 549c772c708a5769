"""DP-SGD on the trainable PEFT tensors via opacus: per-sample clipping, Gaussian noise, Poisson sampling."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Callable, Iterator
from typing import Any, Literal

import torch
from opacus.accountants.utils import get_noise_multiplier
from opacus.data_loader import DPDataLoader
from opacus.optimizers import DPOptimizer
from torch import nn
from torch.utils.data import DataLoader

from fedpeft_edge.config import DpArgs
from fedpeft_edge.errors import PrivacyError
from fedpeft_edge.privacy.grad_sample import GradSampleMode, GradSampler, make_grad_sampler
from fedpeft_edge.privacy.ledger import PrivacyLedger

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DpPlan:
    """The DP-SGD parameters a device trains with, fixed before its first step."""

    noise_multiplier: float
    max_grad_norm: float
    sample_size: int  # training samples on this device
    sample_rate: float  # Poisson inclusion probability q = batch_size / sample_size
    expected_batch_size: int
    steps_per_round: int
    planned_steps: int  # over all planned rounds; the noise is calibrated for these
    planned_epsilon: float  # epsilon after planned_steps from a fresh ledger
    delta: float
    accountant: Literal["rdp", "prv"]
    poisson_sampling: bool


def plan_dp(
    dp_args: DpArgs,
    *,
    sample_size: int,
    batch_size: int,
    epochs_per_round: int,
    planned_rounds: int,
    max_steps_per_round: int | None = None,
) -> DpPlan:
    """Sample rate, steps and noise: `noise_multiplier` as given, or calibrated to `target_epsilon`."""
    _check_counts(sample_size=sample_size, batch_size=batch_size, epochs_per_round=epochs_per_round,
                  planned_rounds=planned_rounds)
    rate = min(1.0, batch_size / sample_size)
    per_epoch = int(1 / rate) if dp_args.poisson_sampling else math.ceil(sample_size / batch_size)
    per_round = per_epoch * epochs_per_round
    if max_steps_per_round is not None:
        per_round = min(per_round, max_steps_per_round)
    planned = per_round * planned_rounds
    noise = dp_args.noise_multiplier
    if noise is None:
        noise = _calibrate_noise(dp_args, rate, planned)
    planned_eps = _fresh_epsilon(noise, rate, planned, dp_args)
    return DpPlan(noise_multiplier=float(noise), max_grad_norm=dp_args.max_grad_norm,
                  sample_size=sample_size, sample_rate=rate,
                  expected_batch_size=max(1, round(rate * sample_size)), steps_per_round=per_round,
                  planned_steps=planned, planned_epsilon=planned_eps, delta=dp_args.target_delta,
                  accountant=dp_args.accountant, poisson_sampling=dp_args.poisson_sampling)


def build_privatizer(
    dp_args: DpArgs,
    *,
    sample_size: int,
    batch_size: int,
    epochs_per_round: int,
    planned_rounds: int,
    ledger_path: str | os.PathLike[str] | None,
    max_steps_per_round: int | None = None,
    grad_sample_mode: GradSampleMode = "auto",
) -> DpPrivatizer | None:
    """The device's privatizer (None when dp_args.enabled is false); its ledger is read from ledger_path."""
    if not dp_args.enabled:
        return None
    plan = plan_dp(dp_args, sample_size=sample_size, batch_size=batch_size, epochs_per_round=epochs_per_round,
                   planned_rounds=planned_rounds, max_steps_per_round=max_steps_per_round)
    budget = dp_args.epsilon_budget if dp_args.epsilon_budget is not None else dp_args.target_epsilon
    if budget is None:
        logger.warning("dp_args has no target_epsilon or epsilon_budget: epsilon is reported but not capped")
    if ledger_path is None:
        logger.warning("privacy ledger kept in memory only: a restart would reset epsilon; "
                       "set device_args.state_dir to persist it")
    ledger = PrivacyLedger(ledger_path, accountant=dp_args.accountant, delta=dp_args.target_delta,
                           budget=budget)
    logger.info("DP-SGD: noise %.4g, clip %g, q %.4g, %s steps/round, planned epsilon %.4g at delta %g",
                plan.noise_multiplier, plan.max_grad_norm, plan.sample_rate, plan.steps_per_round,
                plan.planned_epsilon, plan.delta)
    return DpPrivatizer(plan, ledger, grad_sample_mode=grad_sample_mode)


class DpPrivatizer:
    """Wraps a model, optimizer and loader for DP-SGD once; every step is charged to the ledger first."""

    def __init__(
        self, plan: DpPlan, ledger: PrivacyLedger, *, grad_sample_mode: GradSampleMode = "auto"
    ) -> None:
        self.plan = plan
        self.ledger = ledger
        self.grad_sample_mode = grad_sample_mode
        self._hooks: GradSampler | None = None
        self._bn_guards: list[torch.utils.hooks.RemovableHandle] = []

    @property
    def attached(self) -> bool:
        """True once attach() has run (and detach() has not)."""
        return self._hooks is not None

    def attach(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader[Any]
    ) -> tuple[nn.Module, DPOptimizer, Any]:
        """Make (model, optimizer, loader) private; the model is returned unwrapped (hooks only).

        The loader becomes a Poisson-sampled one; an empty draw is consumed inside it as a noise-only
        step (charged to the ledger), so the training loop only ever sees non-empty batches.
        """
        if self.attached:
            raise PrivacyError("this privatizer is already attached; build one privatizer per model")
        _check_model(model)
        _check_optimizer(model, optimizer)
        _check_loader(loader, self.plan)
        self._bn_guards = _guard_batchnorm(model)
        self._hooks = make_grad_sampler(model, self.grad_sample_mode)
        forbid = getattr(self._hooks, "forbid_grad_accumulation", None)
        if self.plan.poisson_sampling and callable(forbid):
            forbid()
        dp_opt = DPOptimizer(optimizer, noise_multiplier=self.plan.noise_multiplier,
                             max_grad_norm=self.plan.max_grad_norm,
                             expected_batch_size=self.plan.expected_batch_size, loss_reduction="mean")
        dp_opt.attach_step_hook(self._charge_step)
        return model, dp_opt, _private_loader(loader, self.plan, lambda: _noise_only_step(dp_opt))

    def detach(self) -> None:
        """Remove the per-sample-gradient hooks and BatchNorm guards (the model trains normally again)."""
        if self._hooks is not None:
            self._hooks.cleanup()
            self._hooks = None
        for handle in self._bn_guards:
            handle.remove()
        self._bn_guards = []

    def epsilon(self, delta: float | None = None) -> float:
        """Epsilon this device has spent so far (all rounds, all restarts) at delta (default: the plan's)."""
        return self.ledger.epsilon(delta)

    def check_budget(self, steps: int | None = None) -> None:
        """Before a round: raise BudgetExhaustedError unless `steps` (default: a round's) still fit."""
        self.ledger.check_budget(self.plan.noise_multiplier, self.plan.sample_rate,
                                 self.plan.steps_per_round if steps is None else steps)

    def end_round(self, round_idx: int) -> float:
        """After a round: record it in the ledger and return the epsilon to report with the update."""
        return self.ledger.end_round(round_idx)

    def state_dict(self) -> dict[str, Any]:
        """The ledger's state (JSON-able)."""
        return self.ledger.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the ledger's state."""
        self.ledger.load_state_dict(state)

    def _charge_step(self, optimizer: DPOptimizer) -> None:
        # Runs after clipping and noise, before the parameters change: write-ahead accounting.
        rate = self.plan.sample_rate * optimizer.accumulated_iterations
        self.ledger.record_step(self.plan.noise_multiplier, rate)


class PoissonLoader:
    """Poisson-sampled batches; an empty draw runs `on_empty` (a noise-only DP step) instead of a batch."""

    def __init__(self, loader: DPDataLoader, on_empty: Callable[[], None]) -> None:
        self.loader = loader
        self.dataset = loader.dataset
        self.on_empty = on_empty

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        for batch in self.loader:
            if _batch_len(batch) == 0:
                self.on_empty()
                continue
            yield batch


# --- checks and wiring ---------------------------------------------------------------------------------


def _check_counts(**counts: int) -> None:
    for name, value in counts.items():
        if value < 1:
            raise PrivacyError(f"DP planning needs {name} >= 1, got {value}; "
                               "a device with no training data cannot train")


def _calibrate_noise(dp_args: DpArgs, rate: float, steps: int) -> float:
    try:
        noise = get_noise_multiplier(target_epsilon=dp_args.target_epsilon, target_delta=dp_args.target_delta,
                                     sample_rate=rate, steps=steps, accountant=dp_args.accountant)
        return float(noise)
    except ValueError as exc:
        raise PrivacyError(
            f"no noise multiplier reaches target_epsilon={dp_args.target_epsilon} at delta="
            f"{dp_args.target_delta} over {steps} steps (q={rate:.4g}): {exc}; raise dp_args.target_epsilon "
            "or lower the planned rounds / local epochs"
        ) from exc


def _fresh_epsilon(noise: float, rate: float, steps: int, dp_args: DpArgs) -> float:
    if noise <= 0:
        return math.inf
    fresh = PrivacyLedger(None, accountant=dp_args.accountant, delta=dp_args.target_delta)
    return fresh.projected_epsilon(noise, rate, steps)


def _check_model(model: nn.Module) -> None:
    if not any(p.requires_grad for p in model.parameters()):
        raise PrivacyError("the model has no trainable parameters: apply the PEFT method before attaching DP")


def _check_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    owned = {id(p) for p in model.parameters() if p.requires_grad}
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.requires_grad and id(p) not in owned:
                raise PrivacyError(
                    "the optimizer updates a tensor that is not a trainable parameter of the model, so its "
                    "gradient would escape per-sample clipping; build the optimizer over the model's "
                    "trainable parameters"
                )


def _check_loader(loader: DataLoader[Any], plan: DpPlan) -> None:
    if not isinstance(loader, DataLoader):
        raise PrivacyError(f"DP-SGD needs a torch DataLoader over a map-style dataset (to Poisson-sample it), "
                           f"got {type(loader).__name__}; pass the device's training DataLoader")
    n = len(loader.dataset)  # type: ignore[arg-type]
    if n != plan.sample_size:
        raise PrivacyError(
            f"the training loader holds {n} samples but DP was planned for {plan.sample_size}; pass "
            "sample_size=len(train dataset) to build_privatizer so the accounting matches the data"
        )


def _guard_batchnorm(model: nn.Module) -> list[torch.utils.hooks.RemovableHandle]:
    """BatchNorm in eval mode with running statistics is a per-sample affine map (its affine terms may train,
    see grad_sample.frozen_batchnorm_grad_sample); in train mode, or without running statistics, it
    normalises with the batch's own statistics and would mix samples, so it is refused."""

    def refuse_train_mode(module: nn.Module, _inputs: Any) -> None:
        if module.training or getattr(module, "running_mean", None) is None:
            raise PrivacyError(
                f"BatchNorm {type(module).__name__} ran in train mode (or without running statistics) under "
                "DP-SGD, which mixes samples of a batch; keep BatchNorm layers in eval mode with frozen "
                "statistics (the training loop does, for every method)"
            )

    return [mod.register_forward_pre_hook(refuse_train_mode) for mod in model.modules()
            if isinstance(mod, nn.modules.batchnorm._BatchNorm)]


def _private_loader(loader: DataLoader[Any], plan: DpPlan, on_empty: Callable[[], None]) -> Any:
    if not plan.poisson_sampling:
        logger.warning("dp_args.poisson_sampling is false: the reported epsilon assumes Poisson sampling and "
                       "is only an approximation for shuffled fixed-size batches")
        return loader
    dp_loader = DPDataLoader(loader.dataset, sample_rate=plan.sample_rate, collate_fn=loader.collate_fn,
                             num_workers=loader.num_workers, pin_memory=loader.pin_memory)
    return PoissonLoader(dp_loader, on_empty)


def _noise_only_step(optimizer: DPOptimizer) -> None:
    """The DP-SGD step of an empty Poisson draw: no gradient, only noise (skipping it would leak)."""
    optimizer.zero_grad(set_to_none=True)  # the previous batch's step is done; clear its leftovers
    for p in optimizer.params:
        p.grad_sample = p.new_zeros((0, *p.shape))  # type: ignore[attr-defined]
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _batch_len(batch: Any) -> int:
    first = batch[0] if isinstance(batch, (tuple, list)) else batch
    return int(first.shape[0]) if isinstance(first, torch.Tensor) else len(first)
