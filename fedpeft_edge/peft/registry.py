"""PEFT method names -> builders, and the per-method parameter table used for bandwidth planning."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from fedpeft_edge.backbone import create_timm_model
from fedpeft_edge.config import PEFT_METHODS, AdapterArgs, PeftArgs, PromptArgs
from fedpeft_edge.errors import PeftMethodError
from fedpeft_edge.peft.adapter import AdapterMethod
from fedpeft_edge.peft.base import Manifest, PeftMethod
from fedpeft_edge.peft.bias import BiasMethod
from fedpeft_edge.peft.full import FullMethod
from fedpeft_edge.peft.head import HeadMethod
from fedpeft_edge.peft.lora import LoraMethod
from fedpeft_edge.peft.prompt import PromptMethod

METHODS: dict[str, Callable[[PeftArgs], PeftMethod]] = {
    FullMethod.name: lambda a: FullMethod(),
    HeadMethod.name: lambda a: HeadMethod(),
    BiasMethod.name: lambda a: BiasMethod(),
    AdapterMethod.name: lambda a: AdapterMethod(a.adapter),
    PromptMethod.name: lambda a: PromptMethod(a.prompt),
    LoraMethod.name: lambda a: LoraMethod(a.lora),
}
if set(METHODS) != set(PEFT_METHODS):  # a method registered here must be a config choice, and the reverse
    raise PeftMethodError(f"registered PEFT methods {sorted(METHODS)} differ from config.PEFT_METHODS "
                          f"{sorted(PEFT_METHODS)}; add the new method's name to config.PeftMethodName")


def build_method(peft_args: PeftArgs) -> PeftMethod:
    """The method named by `peft_args.method`, configured from its own sub-section."""
    try:
        factory = METHODS[peft_args.method]
    except KeyError as exc:
        raise PeftMethodError(
            f"unknown PEFT method {peft_args.method!r}; set peft_args.method to one of {', '.join(METHODS)}"
        ) from exc
    return factory(peft_args)


@dataclasses.dataclass(frozen=True)
class MethodRow:
    """One row of the method table: what a method shares on a model, and how big that is in fp32."""

    label: str
    method: str
    settings: str
    num_params: int
    total_params: int  # parameters of the backbone alone (what full fine-tuning shares)
    manifest: Manifest

    @property
    def fp32_bytes(self) -> int:
        return self.num_params * 4

    @property
    def fraction(self) -> float:
        """Shared parameters over the backbone's (full fine-tuning) parameters, set by method_table."""
        return self.num_params / self.total_params if self.total_params else 0.0


def paper_variants(adapter_width: int = 96, prompt_tokens: int = 10, lora_r: int = 8) -> list[tuple[str, PeftArgs]]:
    """The paper's method settings (adapter shared, width 96; deep prompt, 10 tokens) plus our variants."""
    return [
        ("full", PeftArgs(method="full")),
        ("head", PeftArgs(method="head")),
        ("bias", PeftArgs(method="bias")),
        ("adapter (shared)", PeftArgs(method="adapter", adapter=AdapterArgs(adapter_width, True))),
        ("adapter (per block)", PeftArgs(method="adapter", adapter=AdapterArgs(adapter_width, False))),
        ("prompt (deep)", PeftArgs(method="prompt", prompt=PromptArgs(prompt_tokens, "deep"))),
        ("prompt (shallow)", PeftArgs(method="prompt", prompt=PromptArgs(prompt_tokens, "shallow"))),
        ("lora", PeftArgs(method="lora", lora=dataclasses.replace(PeftArgs().lora, r=lora_r, alpha=2 * lora_r))),
    ]


def method_table(
    model_name: str, num_classes: int, model_kwargs: Mapping[str, Any] | None = None,
    variants: Sequence[tuple[str, PeftArgs]] | None = None,
) -> list[MethodRow]:
    """Shared parameters per method on `model_name`, built on the meta device (shapes only, no weights).

    A variant that does not apply to the backbone (prompt on a CNN) is left out of the table.
    """
    rows = []
    full_params = 0
    for label, args in variants if variants is not None else paper_variants():
        model = create_timm_model(model_name, num_classes, model_kwargs, device="meta")
        full_params = full_params or sum(p.numel() for p in model.parameters())
        method = build_method(args)
        try:
            method.apply(model)
        except PeftMethodError:
            continue
        manifest = method.manifest(model)
        rows.append(MethodRow(label=label, method=args.method, settings=method.describe(),
                              num_params=manifest.num_params, total_params=full_params, manifest=manifest))
    return rows

