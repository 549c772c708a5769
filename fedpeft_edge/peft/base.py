"""The PEFT method interface: a manifest of shared tensors and exact state exchange for one model."""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from fedpeft_edge.backbone import classifier, named_tensors, unwrap
from fedpeft_edge.errors import PeftMethodError
from fedpeft_edge.finiteness import all_finite
from fedpeft_edge.peft.manifest import Manifest, TensorSpec
from fedpeft_edge.peft.shapes import DeviceLayout, ShapePlan


@dataclasses.dataclass(frozen=True)
class StateBinding:
    """A model's shared tensors by manifest name (the model's own tensors, not copies); `PeftMethod.bind`.

    Valid while the model keeps its tensor objects (no module swapped in or out after binding).
    """

    manifest: Manifest
    tensors: Mapping[str, torch.Tensor]

    def get(self) -> dict[str, torch.Tensor]:
        """Detached contiguous CPU copies of the shared tensors, in manifest order."""
        return {name: t.detach().to("cpu", copy=True).contiguous() for name, t in self.tensors.items()}

    def set(self, state: Mapping[str, torch.Tensor], check_finite: bool = True) -> None:
        """Write `state` after checking keys, shapes, dtypes and finiteness (all or nothing).

        `check_finite=False` for tensors already checked where they entered the process (the codec's decode)
        or made by it (its own training): each tensor's values are read for finiteness once per hop."""
        check_state(self.manifest, state, check_finite)
        with torch.no_grad():
            for name, t in self.tensors.items():
                t.copy_(state[name])


class PeftMethod(abc.ABC):
    """One PEFT method: insert its modules once, then name, read and write exactly the tensors it shares."""

    name: str = ""

    def apply(self, model: nn.Module) -> nn.Module:
        """Insert the method's modules (once) and freeze every tensor the method does not train."""
        if getattr(model, "_fedpeft_method", None) is not None:
            raise PeftMethodError(
                f"model already has PEFT method {model._fedpeft_method!r} applied; build a fresh backbone "
                f"before applying {self.name!r}"
            )
        self._check_supported(model)
        model = self._insert(model)
        trained = set(self._select(model))
        if not trained:
            raise PeftMethodError(f"method {self.name!r} does not apply to {type(unwrap(model)).__name__}: it "
                                  "selects no tensor there (e.g. bias-tuning on a model without biases); pick "
                                  "another peft_args.method, such as 'lora'")
        for key, tensor in named_tensors(model).items():
            if isinstance(tensor, nn.Parameter):
                tensor.requires_grad_(key in trained)
        model._fedpeft_method = self.name  # type: ignore[assignment]
        return model

    def manifest(self, model: nn.Module) -> Manifest:
        """The ordered (state-dict order) names, shapes and dtypes of the tensors this method shares."""
        tensors = named_tensors(model)
        chosen = set(self._select(model))
        specs = tuple(TensorSpec.of(k, t) for k, t in tensors.items() if k in chosen)
        if not specs:
            raise PeftMethodError(f"method {self.name!r} selects no tensor on {type(model).__name__}; "
                                  "was apply() called on this model?")
        return Manifest(method=self.name, tensors=specs)

    def bind(self, model: nn.Module) -> StateBinding:
        """The shared tensors of `model`, looked up once (a walk of its whole state dict): a process that swaps
        many devices' states through one model reads and writes them without walking it again."""
        manifest = self.manifest(model)
        tensors = named_tensors(model)
        return StateBinding(manifest, {s.name: tensors[s.name] for s in manifest.tensors})

    def get_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Detached contiguous CPU copies of the shared tensors, in manifest order."""
        return self.bind(model).get()

    def set_state(self, model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
        """Write `state` into the model after checking keys, shapes, dtypes and finiteness (all or nothing)."""
        self.bind(model).set(state)

    def export_model(self, model: nn.Module) -> nn.Module:
        """The model to export for inference (ONNX), with what can be merged merged; `model` stays unchanged.

        The default returns `model` itself: plain parameters (bias, head, full) need no merging and inserted
        modules (prompts, adapters) stay in the graph. LoRA overrides it to fold B @ A into the weights.
        """
        return model

    def describe(self) -> str:
        """The method's settings in a few words, for tables and logs."""
        return ""

    def shape_plan(self, manifest: Manifest) -> ShapePlan:
        """The server's per-device shapes and merge (peft/shapes.py); the default: the manifest for every device."""
        return ShapePlan()

    def layout_at(self, manifest: Manifest, rank: int) -> DeviceLayout:
        """A device's layout when its task names `rank`; a method without ranks refuses."""
        raise PeftMethodError(f"the server named rank {rank} but method {self.name!r} has no rank; run the agent "
                              "with the server's peft_args")

    # --- what each method provides ---

    def _check_supported(self, model: nn.Module) -> None:  # noqa: B027 - optional hook
        """Raise PeftMethodError if the method cannot run on this backbone."""

    def _insert(self, model: nn.Module) -> nn.Module:
        """Add the method's modules; the default adds none."""
        return model

    @abc.abstractmethod
    def _select(self, model: nn.Module) -> Iterable[str]:
        """Canonical names of the tensors this method trains and shares (structural, not by requires_grad)."""


def check_state(manifest: Manifest, state: Mapping[str, Any], check_finite: bool = True) -> None:
    """Refuse a state whose keys, shapes, dtypes or (`check_finite`) values do not match the manifest."""
    names = manifest.names
    missing = [n for n in names if n not in state]
    known = set(names)
    extra = [k for k in state if k not in known]
    if missing or extra:
        raise PeftMethodError(
            f"state does not match manifest {manifest.method!r} ({manifest.hash[:12]}): missing {missing[:5]} "
            f"({len(missing)}), extra {extra[:5]} ({len(extra)}); send exactly the manifest's tensors"
        )
    for spec in manifest.tensors:
        value = state[spec.name]
        if not isinstance(value, torch.Tensor):
            raise PeftMethodError(f"state[{spec.name!r}] is a {type(value).__name__}, expected a torch.Tensor")
        if tuple(value.shape) != spec.shape:
            raise PeftMethodError(f"state[{spec.name!r}] has shape {tuple(value.shape)}, manifest says {spec.shape}")
        if str(value.dtype).removeprefix("torch.") != spec.dtype:
            raise PeftMethodError(
                f"state[{spec.name!r}] has dtype {value.dtype}, manifest says {spec.dtype}; cast it before set_state"
            )
        if check_finite and not all_finite(value):
            raise PeftMethodError(f"state[{spec.name!r}] holds NaN or infinite values; refusing the update")


def parameter_names(model: nn.Module) -> list[str]:
    """Canonical names of every parameter (not buffer) of the model, each parameter once: a tied parameter (a
    causal LM's output layer sharing the token embedding) travels under its first name only, not twice."""
    seen: set[int] = set()
    names = []
    for k, t in named_tensors(model).items():
        if isinstance(t, nn.Parameter) and id(t) not in seen:
            seen.add(id(t))
            names.append(k)
    return names


def head_names(model: nn.Module) -> list[str]:
    """Canonical names of the classifier's parameters (timm's get_classifier()); none for a model that has no
    head by design (a causal LM declares `has_head = False`: its output layer is tied to the embeddings)."""
    if getattr(unwrap(model), "has_head", True) is False:
        return []
    head = classifier(model)
    if head is None or not any(True for _ in head.parameters()):
        raise PeftMethodError(f"{type(model).__name__} has no classifier with parameters; build it with "
                              "model_args.num_classes > 0")
    ids = {id(p) for p in head.parameters()}
    return [k for k, t in named_tensors(model).items() if id(t) in ids]
