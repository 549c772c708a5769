"""Per-sample gradients of the trainable tensors only: opacus' layer hooks, or torch.func over the model."""

from __future__ import annotations

import logging
from typing import Any, Literal, Protocol

import torch
from opacus.grad_sample import GradSampleHooks
from opacus.grad_sample.grad_sample_module import (
    create_or_accumulate_grad_sample,
    promote_current_grad_sample,
)
from opacus.utils.module_utils import trainable_parameters
from torch import nn
from torch.func import functional_call, grad, vmap

from fedpeft_edge.errors import PrivacyError

logger = logging.getLogger(__name__)

GradSampleMode = Literal["auto", "hooks", "functorch"]


class GradSampler(Protocol):
    """Fills `p.grad_sample` (batch, *p.shape) for every trainable parameter on each backward pass."""

    def cleanup(self) -> None: ...


def choose_mode(model: nn.Module, mode: GradSampleMode) -> Literal["hooks", "functorch"]:
    """'auto': opacus hooks when every trainable tensor sits in a layer opacus knows (or a subclass of
    one, whose own forward opacus replays), else torch.func over the whole model (e.g. prompt tokens
    read by hooks outside any forward, or trainable tensors on a container such as a ViT's cls_token)."""
    if mode != "auto":
        return mode
    known = tuple(GradSampleHooks.GRAD_SAMPLERS)
    for _, module in _modules_with_trainable_params(model):
        if not isinstance(module, known):
            logger.debug("per-sample gradients by torch.func: %s holds trainable tensors",
                         type(module).__name__)
            return "functorch"
    return "hooks"


def make_grad_sampler(model: nn.Module, mode: GradSampleMode) -> GradSampler:
    """Attach the chosen per-sample-gradient engine to `model` (which stays unwrapped)."""
    chosen = choose_mode(model, mode)
    if chosen == "functorch":
        return ModelFunctorchSampler(model)
    try:
        return EmptyBatchSafeHooks(model, batch_first=True, loss_reduction="mean", strict=True)
    except NotImplementedError as exc:
        raise PrivacyError(
            f"opacus cannot compute per-sample gradients for this model ({exc}); a trainable layer holds "
            "buffers (e.g. BatchNorm statistics). Freeze that layer, or use peft_args.method 'lora' or 'head'"
        ) from exc


class EmptyBatchSafeHooks(GradSampleHooks):
    """opacus' hooks, plus empty Poisson batches (functorch's vmap cannot map over zero samples)."""

    def capture_backprops_hook(self, module: nn.Module, _forward_input: Any, forward_output: Any,
                               loss_reduction: str, batch_first: bool) -> None:
        out = forward_output[0]
        if not self.hooks_enabled or out.dim() == 0 or out.shape[0 if batch_first else 1] != 0:
            super().capture_backprops_hook(module, _forward_input, forward_output, loss_reduction,
                                           batch_first)
            return
        module.activations.pop()  # type: ignore[union-attr,operator]
        for _, p in trainable_parameters(module):
            create_or_accumulate_grad_sample(param=p, grad_sample=p.new_zeros((0, *p.shape)), max_batch_len=0)
            p._forward_counter -= 1  # type: ignore[attr-defined]
            if p._forward_counter == 0:  # type: ignore[attr-defined]
                promote_current_grad_sample(p)
        if not module.activations and hasattr(module, "max_batch_len"):
            del module.max_batch_len


class ModelFunctorchSampler:
    """Per-sample gradients by vmap(grad) over the WHOLE model, differentiating the trainable tensors only.

    Captures the model's input on forward; on backward, recomputes each sample's loss surrogate
    <model(x_i), dL/dout_i * n> (n: batch size, undoing the mean reduction) and takes its gradient with
    respect to the trainable tensors, so the frozen backbone never gets per-sample gradients. This works
    for tensors used anywhere in the forward (hooks, shared modules, plain nn.Parameters).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.params = [p for p in model.parameters() if p.requires_grad]
        self._replaying = False
        # A tensor hook on the output, not a module backward hook: the latter's autograd.Function
        # would also wrap the replayed forward, which torch.func transforms refuse.
        self._handles = [model.register_forward_hook(self._capture, with_kwargs=True)]

    def cleanup(self) -> None:
        """Remove the hooks and any per-sample gradients left on the parameters."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for p in self.params:
            if hasattr(p, "grad_sample"):
                del p.grad_sample

    def _capture(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        if self._replaying or not module.training or not torch.is_grad_enabled():
            return
        if len(args) != 1 or kwargs or not isinstance(args[0], torch.Tensor):
            raise PrivacyError("DP-SGD (torch.func mode) needs the model called as model(inputs) with one "
                               f"batched tensor; got {len(args)} positional and {len(kwargs)} keyword args")
        if not isinstance(out, torch.Tensor) or not out.requires_grad:
            return
        x = args[0].detach()
        out.register_hook(lambda g: self._on_output_grad(x, g))

    def _on_output_grad(self, x: torch.Tensor, grad_out: torch.Tensor) -> None:
        n = x.shape[0]
        if n == 0:
            samples = [p.new_zeros((0, *p.shape)) for p in self.params]
        else:
            samples = self._per_sample(x, grad_out.detach() * n)
        for p, gs in zip(self.params, samples, strict=True):
            if getattr(p, "grad_sample", None) is not None:
                raise PrivacyError("per-sample gradients from an earlier batch were not consumed: call "
                                   "optimizer.step() (or zero_grad()) after every backward under DP-SGD")
            p.grad_sample = gs  # type: ignore[attr-defined]

    def _per_sample(self, x: torch.Tensor, backprops: torch.Tensor) -> list[torch.Tensor]:
        names = self.names

        def surrogate(tensors: tuple[torch.Tensor, ...], xi: torch.Tensor, gi: torch.Tensor) -> torch.Tensor:
            out = functional_call(self.model, dict(zip(names, tensors, strict=True)), (xi.unsqueeze(0),))
            return (out * gi.unsqueeze(0)).sum()

        detached = tuple(p.detach() for p in self.params)
        self._replaying = True
        try:
            with torch.enable_grad():
                per_sample = vmap(grad(surrogate), in_dims=(None, 0, 0), randomness="different")
                grads = per_sample(detached, x, backprops)
        finally:
            self._replaying = False
        return list(grads)


def _modules_with_trainable_params(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules()
            if any(p.requires_grad for p in m.parameters(recurse=False))]
