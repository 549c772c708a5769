"""THE local training and evaluation loop: agents, simulation and server-side evaluation all call it."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

import torch
from torch import nn

from fedpeft_edge.config import TrainArgs
from fedpeft_edge.errors import TrainingError

log = logging.getLogger(__name__)

Batch = Any  # (inputs, labels) as a DataLoader yields them
IGNORE_INDEX = -100  # a target that counts for nothing (a causal LM's padding): cross_entropy's default


class Privatizer(Protocol):
    """What LocalTrainer needs from a DP wrapper (fedpeft_edge.privacy): attach once, report epsilon."""

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer, loader: Any) -> tuple[Any, Any, Any]: ...

    def epsilon(self) -> float: ...

    def detach(self) -> None: ...


@dataclasses.dataclass(frozen=True)
class StepStats:
    """One optimizer step: its index, images, mean loss, and time spent waiting for data vs computing."""

    step: int
    batch_size: int
    loss: float
    data_s: float
    compute_s: float


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """One local training call: steps and samples seen (images, or a causal LM's target tokens), mean loss and
    top-1 on the training batches."""

    steps: int
    samples: int
    loss: float
    accuracy: float
    wall_s: float
    compute_s: float = 0.0  # forward + backward + step only (no data loading)
    data_s: float = 0.0  # waiting for the loader
    loss_end: float = math.nan  # mean loss of the last quarter of the steps (at least one): where training ended

    @property
    def images_per_s(self) -> float:
        """Training throughput on compute time (0 if nothing ran)."""
        return self.samples / self.compute_s if self.compute_s > 0 else 0.0


@dataclasses.dataclass(frozen=True)
class EvalResult:
    """Mean cross-entropy loss and top-1 accuracy over `samples` targets: images, or a causal LM's tokens (then
    top-1 is next-token accuracy and exp(loss) the perplexity)."""

    loss: float
    top1: float
    samples: int


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """"auto" -> CUDA when present, else CPU; "cuda" without CUDA (or "mps" without MPS) is an error."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise TrainingError(f"device {name!r} requested but CUDA is not available; use device_args.device='auto'")
    if name == "mps" and not torch.backends.mps.is_available():
        raise TrainingError("device 'mps' requested but torch has no MPS backend here (Apple silicon, macOS 12.3+); "
                            "use device_args.device='auto'")
    return torch.device(name)


class LocalTrainer:
    """Local training for E epochs or S steps; the optimizer is built once and reused every round.

    BatchNorm layers run in eval mode for every method (running statistics stay as loaded: they are buffers
    that would drift per device under non-IID data and are never shared). Optimizer state (momentum) is cleared
    at the start of each train() call, as a freshly built optimizer would be, unless `keep_optimizer_state`.
    """

    def __init__(
        self, model: nn.Module, train_args: TrainArgs, device: torch.device | str, train_loader: Iterable[Batch],
        privatizer: Privatizer | None = None, *, seed: int | None = None,
        on_step: Callable[[StepStats], None] | None = None, keep_optimizer_state: bool = False,
    ) -> None:
        self.args = train_args
        self.device = resolve_device(device)
        self.seed, self.on_step, self.keep_optimizer_state = seed, on_step, keep_optimizer_state
        self._model = model.to(self.device)
        self.base_optimizer = build_optimizer(self._model, train_args)
        self._modes: tuple[nn.Module, list[tuple[nn.Module, bool]]] | None = None
        self.privatizer: Privatizer | None = None
        self.bind(train_loader, privatizer)
        self._calls = 0
        self._steps = 0

    def bind(self, train_loader: Iterable[Batch], privatizer: Privatizer | None = None) -> None:
        """Train on another loader (and DP wrapper) with the same model and optimizer: how a process that
        hosts many devices swaps one device's data in. The previous privatizer is detached first."""
        if self.privatizer is not None:
            self.privatizer.detach()
        self.model, self.optimizer, self.train_loader = self._model, self.base_optimizer, train_loader
        self.privatizer = privatizer
        if privatizer is not None:
            self.model, self.optimizer, self.train_loader = privatizer.attach(
                self.model, self.optimizer, self.train_loader)
        self._amp = _amp_dtype(self.device, self.args.mixed_precision and privatizer is None)
        self._scaler = torch.amp.GradScaler("cuda") if self._amp is torch.float16 else None

    def train(self, epochs: int | None = None, max_steps: int | None = None) -> TrainResult:
        """Train `epochs` passes, or exactly `max_steps` steps (cycling the loader) when a step count is set."""
        steps_cap = max_steps if max_steps is not None else (self.args.max_steps if epochs is None else None)
        n_epochs = epochs if epochs is not None else self.args.epochs
        if (steps_cap is not None and steps_cap <= 0) or (steps_cap is None and n_epochs <= 0):
            raise TrainingError(f"train() needs epochs > 0 or max_steps > 0, got epochs={epochs} "
                                f"max_steps={max_steps}")
        self._begin()
        totals = _Totals()
        start = time.perf_counter()
        for batch, data_s in self._batches(n_epochs, steps_cap):
            stats = self._step(batch, data_s, totals)
            if self.on_step is not None:
                self.on_step(stats)
        wall = time.perf_counter() - start
        result = totals.result(wall)
        log.debug("trained %d steps, %d samples, loss %.4f in %.2fs", result.steps, result.samples,
                  result.loss, wall)
        return result

    def _begin(self) -> None:
        self._calls += 1
        if self.seed is not None:
            torch.manual_seed(self.seed * 1_000_003 + self._calls)
        if not self.keep_optimizer_state:
            self.optimizer.state.clear()
        if self._modes is None or self._modes[0] is not self.model:
            # Every module and the mode training wants it in (BatchNorm eval, the rest train), listed once per
            # model: a window checks the flags and walks the model only if something changed them (evaluation).
            self._modes = (self.model, [(m, not isinstance(m, nn.modules.batchnorm._BatchNorm))
                                        for m in self.model.modules()])
        if any(m.training is not mode for m, mode in self._modes[1]):
            self.model.train()
            set_batchnorm_eval(self.model)

    def _batches(self, epochs: int, max_steps: int | None) -> Iterator[tuple[Batch, float]]:
        """(batch, seconds waited) over `epochs` passes or until `max_steps` non-empty batches."""
        done, passes = 0, 0
        while (max_steps is None and passes < epochs) or (max_steps is not None and done < max_steps):
            passes += 1
            seen = 0
            waited = time.perf_counter()
            for batch in self.train_loader:
                if _batch_size(batch) == 0:  # opacus' Poisson sampling can draw an empty batch
                    continue
                seen += 1
                yield batch, time.perf_counter() - waited
                done += 1
                if max_steps is not None and done >= max_steps:
                    return
                waited = time.perf_counter()
            if seen == 0:
                raise TrainingError("the training loader yielded no non-empty batch; give the device data "
                                    "or a smaller data_args.batch_size")

    def _step(self, batch: Batch, data_s: float, totals: _Totals) -> StepStats:
        t0 = time.perf_counter()
        inputs, labels = _to_device(batch, self.device)
        self.optimizer.zero_grad(set_to_none=True)
        with _autocast(self.device, self._amp):
            logits = self.model(inputs)
            loss = nn.functional.cross_entropy(logits.float(), labels)
        if not torch.isfinite(loss):
            raise TrainingError(f"training loss became {loss.item()} at step {self._steps + 1}; lower "
                                f"train_args.learning_rate (now {self.args.learning_rate}) or set grad_clip_norm")
        self._backward_and_step(loss)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        compute_s = time.perf_counter() - t0
        self._steps += 1
        n, correct = _count_correct(logits.detach(), labels)
        totals.add(n, float(loss.detach()), correct, data_s, compute_s)
        return StepStats(step=self._steps, batch_size=n, loss=float(loss.detach()), data_s=data_s,
                         compute_s=compute_s)

    def _backward_and_step(self, loss: torch.Tensor) -> None:
        clip = self.args.grad_clip_norm if self.privatizer is None else None  # DP clips per sample itself
        if self._scaler is not None:
            self._scaler.scale(loss).backward()
            if clip is not None:
                self._scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(_trainable(self.model), clip)
            self._scaler.step(self.optimizer)
            self._scaler.update()
            return
        loss.backward()
        if clip is not None:
            nn.utils.clip_grad_norm_(_trainable(self.model), clip)
        self.optimizer.step()


@dataclasses.dataclass
class _Totals:
    steps: int = 0
    samples: int = 0
    loss_sum: float = 0.0
    correct: int = 0
    data_s: float = 0.0
    compute_s: float = 0.0
    step_losses: list[tuple[int, float]] = dataclasses.field(default_factory=list)

    def add(self, n: int, loss: float, correct: int, data_s: float, compute_s: float) -> None:
        self.steps += 1
        self.samples += n
        self.loss_sum += loss * n
        self.step_losses.append((n, loss))
        self.correct += correct
        self.data_s += data_s
        self.compute_s += compute_s

    def result(self, wall_s: float) -> TrainResult:
        n = max(self.samples, 1)
        tail = self.step_losses[-max(1, len(self.step_losses) // 4):]
        tail_n = sum(k for k, _ in tail)
        loss_end = sum(k * v for k, v in tail) / tail_n if tail_n else math.nan
        return TrainResult(steps=self.steps, samples=self.samples, loss=self.loss_sum / n,
                           accuracy=self.correct / n, wall_s=wall_s, compute_s=self.compute_s, data_s=self.data_s,
                           loss_end=loss_end)


def build_optimizer(model: nn.Module, train_args: TrainArgs) -> torch.optim.Optimizer:
    """SGD (momentum, Nesterov, weight decay, as in the paper) or AdamW over the trainable parameters."""
    params = _trainable(model)
    if not params:
        raise TrainingError("the model has no trainable parameter; apply a PEFT method before training")
    a = train_args
    if a.client_optimizer == "adamw":
        return torch.optim.AdamW(params, lr=a.learning_rate, weight_decay=a.weight_decay)
    if a.client_optimizer != "sgd":
        raise TrainingError(f"train_args.client_optimizer={a.client_optimizer!r}; use 'sgd' or 'adamw'")
    nesterov = a.nesterov and a.momentum > 0  # torch refuses Nesterov without momentum
    return torch.optim.SGD(params, lr=a.learning_rate, momentum=a.momentum, nesterov=nesterov,
                           weight_decay=a.weight_decay)


def evaluate(model: nn.Module, loader: Iterable[Batch], device: torch.device | str,
             mixed_precision: bool = True) -> EvalResult:
    """Mean loss and top-1 of `model` over `loader` (eval mode, no gradients); restores the training mode."""
    dev = resolve_device(device)
    was_training = model.training
    model.eval()
    loss_sum, correct, samples = 0.0, 0, 0
    try:
        with torch.no_grad(), _autocast(dev, _amp_dtype(dev, mixed_precision)):
            for batch in loader:
                if _batch_size(batch) == 0:
                    continue
                inputs, labels = _to_device(batch, dev)
                logits = model(inputs).float()
                loss_sum += float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
                n, right = _count_correct(logits, labels)
                correct += right
                samples += n
    finally:
        model.train(was_training)
    if samples == 0:
        return EvalResult(loss=math.nan, top1=math.nan, samples=0)
    return EvalResult(loss=loss_sum / samples, top1=correct / samples, samples=samples)


def set_batchnorm_eval(model: nn.Module) -> None:
    """Freeze BatchNorm running statistics (their affine terms still train if the method trains them)."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _count_correct(logits: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """(targets, correct argmax predictions): an image's label is one target; a causal LM's batch has a target
    per position, IGNORE_INDEX (-100, cross_entropy's default ignore_index) where there is no next token."""
    valid = labels != IGNORE_INDEX
    return int(valid.sum()), int(((logits.argmax(dim=1) == labels) & valid).sum())


def _batch_size(batch: Batch) -> int:
    inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
    return int(inputs.shape[0]) if isinstance(inputs, torch.Tensor) else len(inputs)


def _to_device(batch: Batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise TrainingError(f"a batch must be (inputs, labels), got {type(batch).__name__}")
    inputs, labels = batch[0], batch[1]
    if labels.dim() > 1:  # a target per position (causal LM): one row each, as the model returns (B*T, C)
        labels = labels.reshape(-1)
    non_blocking = device.type == "cuda"
    return (inputs.to(device, non_blocking=non_blocking),
            labels.to(device, dtype=torch.long, non_blocking=non_blocking))


def _amp_dtype(device: torch.device, enabled: bool) -> torch.dtype | None:
    if not enabled or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[Any]:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
