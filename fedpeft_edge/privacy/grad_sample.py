"""Per-sample gradients of the trainable tensors only: opacus' layer hooks, or torch.func over the model.

Beyond opacus' own layers, eval-mode BatchNorm (frozen running statistics) gets per-sample gradients for its
affine terms: with fixed statistics it is a per-sample affine map, so a sample's output depends on no other.
"""

from __future__ import annotations

import logging
from typing import Any, Literal, Protocol

import torch
from opacus.grad_sample import GradSampleHooks
from opacus.grad_sample.grad_sample_module import (
    create_or_accumulate_grad_sample,
    promote_current_grad_sample,
)
from opacus.utils.module_utils import trainable_modules, trainable_parameters
from torch import nn
from torch.func import functional_call, grad, vmap

from fedpeft_edge.errors import PrivacyError

logger = logging.getLogger(__name__)

GradSampleMode = Literal["auto", "hooks", "functorch"]
_BatchNorm = nn.modules.batchnorm._BatchNorm


class GradSampler(Protocol):
    """Fills `p.grad_sample` (batch, *p.shape) for every trainable parameter on each backward pass."""

    def cleanup(self) -> None: ...


def choose_mode(model: nn.Module, mode: GradSampleMode) -> Literal["hooks", "functorch"]:
    """'auto': opacus hooks when every trainable tensor sits in a layer opacus knows (or a subclass of
    one, whose own forward opacus replays), else torch.func over the whole model (e.g. prompt tokens
    read by hooks outside any forward, or trainable tensors on a container such as a ViT's cls_token)."""
    if mode != "auto":
        return mode
    known = tuple(EmptyBatchSafeHooks.GRAD_SAMPLERS)
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
            f"opacus cannot compute per-sample gradients for this model ({exc}); a trainable layer other than "
            "BatchNorm holds buffers. Freeze that layer, or use peft_args.method 'lora' or 'head'"
        ) from exc


def frozen_batchnorm_grad_sample(
    layer: nn.Module, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients of an eval-mode BatchNorm's trainable tensors, by replaying its forward per sample.

    The replay runs the layer's own `forward` (so timm's BatchNormAct2d keeps its activation) without its
    hooks, with the running statistics as constants. Train mode is refused: batch statistics mix samples.
    """
    _check_frozen_batchnorm(layer)
    params = dict(trainable_parameters(layer))
    replay = _HooklessForward(layer)

    def surrogate(tensors: dict[str, torch.Tensor], xi: torch.Tensor, gi: torch.Tensor) -> torch.Tensor:
        out = functional_call(replay, {f"layer.{k}": v for k, v in tensors.items()}, (xi.unsqueeze(0),))
        return (out * gi.unsqueeze(0)).sum()

    detached = {k: p.detach() for k, p in params.items()}
    with torch.enable_grad():
        grads = vmap(grad(surrogate), in_dims=(None, 0, 0))(detached, activations[0], backprops)
    return {p: grads[k] for k, p in params.items()}


class _HooklessForward(nn.Module):
    """Calls `layer.forward` directly: the layer's opacus hooks must not see (or wrap) the replay."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.layer.forward(x)
        return out


def _check_frozen_batchnorm(layer: nn.Module) -> None:
    if layer.training or getattr(layer, "running_mean", None) is None:
        raise PrivacyError(
            f"{type(layer).__name__} normalises with batch statistics (train mode, or no running statistics), "
            "which mixes the samples of a batch, so it has no per-sample gradient under DP-SGD; keep BatchNorm "
            "layers in eval mode with running statistics (the training loop does)"
        )


class EmptyBatchSafeHooks(GradSampleHooks):
    """opacus' hooks, plus empty Poisson batches (functorch's vmap cannot map over zero samples) and
    eval-mode BatchNorm affine terms (opacus refuses any trainable layer with buffers, and captures nothing
    from a layer in eval mode)."""

    GRAD_SAMPLERS = {**GradSampleHooks.GRAD_SAMPLERS, _BatchNorm: frozen_batchnorm_grad_sample}

    def __init__(self, m: nn.Module, **kwargs: Any) -> None:
        # A hooked layer's output is a view made by the backward hook; an in-place activation after it (timm's
        # SiLU/ReLU in a squeeze-excite block) is refused by autograd, so activations run out of place while
        # attached (same values) and are restored by cleanup().
        self._inplace = [mod for mod in m.modules() if getattr(mod, "inplace", None) is True]
        for mod in self._inplace:
            setattr(mod, "inplace", False)  # noqa: B010 (nn.Module's attribute type hides the flag)
        super().__init__(m, **kwargs)

    def cleanup(self) -> None:
        """Remove opacus' hooks and attributes, and restore the in-place activations."""
        super().cleanup()
        for mod in self._inplace:
            setattr(mod, "inplace", True)  # noqa: B010
        self._inplace = []

    def _get_module_type(self, module: nn.Module) -> Any:
        return _BatchNorm if isinstance(module, _BatchNorm) else type(module)

    @classmethod
    def validate(cls, module: nn.Module, *, strict: bool = False) -> list[NotImplementedError]:
        """opacus' check that no trainable layer holds buffers, except BatchNorm's running statistics (read
        only in eval mode, which `frozen_batchnorm_grad_sample` enforces)."""
        errors = [NotImplementedError(f"trainable layer {name} ({type(m).__name__}) holds buffers")
                  for name, m in trainable_modules(module)
                  if not isinstance(m, _BatchNorm) and any(True for _ in m.buffers())]
        if strict and errors:
            raise NotImplementedError(errors)
        return errors

    def capture_activations_hook(self, module: nn.Module, forward_input: Any, _forward_output: Any) -> None:
        if not isinstance(module, _BatchNorm) or module.training:
            super().capture_activations_hook(module, forward_input, _forward_output)
            return
        # opacus skips eval-mode layers; a frozen BatchNorm inside a training model still trains its affine terms
        if not self.hooks_enabled or not self._module.training or not torch.is_grad_enabled():
            return
        if not any(p.requires_grad for p in module.parameters(recurse=False)):
            return
        if not hasattr(module, "activations"):
            setattr(module, "activations", [])  # noqa: B010 (where opacus keeps a layer's inputs)
        module.activations.append([t.detach() for t in forward_input])  # type: ignore[operator,union-attr]
        for _, p in trainable_parameters(module):
            p._forward_counter += 1  # type: ignore[attr-defined]

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
