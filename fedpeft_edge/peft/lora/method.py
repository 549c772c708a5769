"""LoRA through Hugging Face peft on timm modules: attention and MLP linears (ViT), 1x1/3x3 convs (CNN)."""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Iterable

import torch
from torch import nn

from fedpeft_edge.backbone import classifier, named_tensors, unwrap
from fedpeft_edge.config import LoraArgs
from fedpeft_edge.errors import PeftMethodError
from fedpeft_edge.peft.base import Manifest, PeftMethod, head_names
from fedpeft_edge.peft.lora.ffa import freeze_lora_a
from fedpeft_edge.peft.shapes import DeviceLayout, ShapePlan

log = logging.getLogger(__name__)

_VIT_LINEARS = re.compile(r"(^|\.)(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)$")


class LoraMethod(PeftMethod):
    """peft's LoRA layers injected in place (`peft.inject_adapter_in_model`); lora_A/lora_B and the head train.

    peft renames a wrapped layer's tensors (`qkv.base_layer.weight`, `qkv.lora_A.default.weight`); manifest
    keys are canonical (`qkv.weight`, `qkv.lora_A.weight`, see backbone.canonical_name), so they stay the
    backbone's own names and the frozen-backbone fingerprint equals the one of the other methods.
    """

    name = "lora"

    def __init__(self, args: LoraArgs | None = None) -> None:
        self.args = args or LoraArgs()
        if self.args.r <= 0 or self.args.alpha <= 0:
            raise PeftMethodError(f"peft_args.lora.r and .alpha must be > 0, got r={self.args.r} "
                                  f"alpha={self.args.alpha}")
        if not 0.0 <= self.args.dropout < 1.0:
            raise PeftMethodError(f"peft_args.lora.dropout must be in [0, 1), got {self.args.dropout}")

    def describe(self) -> str:
        agg = f" {self.args.aggregation}" if self.args.aggregation != "fedit" else ""
        return f"r={self.args.r} alpha={self.args.alpha}{agg}"

    def shape_plan(self, manifest: Manifest) -> ShapePlan:
        """flexlora: per-device ranks and the product merge (ranks.py); fedit and ffa: the plain mean."""
        if self.args.aggregation != "flexlora":
            return ShapePlan()
        from fedpeft_edge.peft.lora.ranks import LoraRankPlan

        return LoraRankPlan(manifest, self.args)

    def layout_at(self, manifest: Manifest, rank: int) -> DeviceLayout:
        from fedpeft_edge.peft.lora.ranks import LoraLayout

        return LoraLayout(manifest, rank)

    def _insert(self, model: nn.Module) -> nn.Module:
        from peft import LoraConfig, inject_adapter_in_model  # heavy import (transformers): only for LoRA

        targets = self._targets(model)
        config = LoraConfig(r=self.args.r, lora_alpha=self.args.alpha, lora_dropout=self.args.dropout,
                            target_modules=targets, bias="none")
        try:
            inject_adapter_in_model(config, unwrap(model))
        except (ValueError, TypeError, RuntimeError) as exc:
            raise PeftMethodError(f"peft could not inject LoRA into {targets[:3]}... ({len(targets)} modules): "
                                  f"{exc}; name other modules in peft_args.lora.target_modules") from exc
        if self.args.aggregation == "ffa":  # the caller seeded torch with the run's seed (runtime, server)
            freeze_lora_a(model, torch.initial_seed())
        return model

    def export_model(self, model: nn.Module) -> nn.Module:
        """A copy of `model` with each LoRA layer merged into its base layer (W + scale * B @ A), unwrapped."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        merged = copy.deepcopy(model)
        root = unwrap(merged)
        for name, module in list(root.named_modules()):
            if isinstance(module, BaseTunerLayer):
                module.merge(safe_merge=True)
                parent_name, _, child = name.rpartition(".")
                parent = root.get_submodule(parent_name) if parent_name else root
                setattr(parent, child, module.get_base_layer())
        return merged

    def _targets(self, model: nn.Module) -> list[str]:
        if self.args.target_modules:
            return list(self.args.target_modules)
        declared = getattr(unwrap(model), "lora_targets", None)  # a text backbone names its own (fedpeft_edge/llm)
        if declared:
            return list(declared)
        head = {id(m) for m in _head_modules(model)}
        names = [n for n, m in unwrap(model).named_modules()
                 if id(m) not in head and _default_target(n, m)]
        if not names:
            raise PeftMethodError(
                f"no default LoRA target in {type(unwrap(model)).__name__} (attention qkv/proj and MLP linears, "
                "or 1x1/3x3 non-grouped Conv2d); name modules in peft_args.lora.target_modules"
            )
        log.debug("LoRA targets: %d modules", len(names))
        return names

    def _select(self, model: nn.Module) -> Iterable[str]:
        shared = (".lora_B.",) if self.args.aggregation == "ffa" else (".lora_A.", ".lora_B.")
        lora = [k for k, t in named_tensors(model).items()
                if isinstance(t, nn.Parameter) and any(s in k for s in shared)]
        if not lora:
            raise PeftMethodError("the model has no LoRA layers; call LoraMethod.apply(model) first")
        return lora + head_names(model)


def _default_target(name: str, module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return bool(_VIT_LINEARS.search(name))
    # Exactly nn.Conv2d: timm's Conv2dSame pads dynamically and peft's LoRA conv would not match its output.
    return (type(module) is nn.Conv2d and module.groups == 1
            and tuple(module.kernel_size) in ((1, 1), (3, 3)))


def _head_modules(model: nn.Module) -> list[nn.Module]:
    head = classifier(model)
    return list(head.modules()) if head is not None else []
