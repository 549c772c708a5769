"""Adapter tuning: a bottleneck adapter after each transformer block's MLP, plus the head."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from fedpeft_edge.backbone import named_tensors, unwrap
from fedpeft_edge.config import AdapterArgs
from fedpeft_edge.errors import PeftMethodError
from fedpeft_edge.peft.adapter.layer import BottleneckAdapter
from fedpeft_edge.peft.base import PeftMethod, head_names


class AdapterMethod(PeftMethod):
    """One adapter per block (default) as `blocks.<i>.adapter`, or one shared `adapter` for all blocks.

    The adapter runs as a forward hook on `blocks.<i>.mlp`, so every backbone tensor keeps its own name.
    `shared_across_blocks=True` with width 96 on ViT-B/16 reproduces the paper's 225,220 parameters.
    """

    name = "adapter"

    def __init__(self, args: AdapterArgs | None = None) -> None:
        self.args = args or AdapterArgs()
        if self.args.width <= 0:
            raise PeftMethodError(f"peft_args.adapter.width must be > 0, got {self.args.width}")

    def describe(self) -> str:
        return f"width={self.args.width} shared={self.args.shared_across_blocks}"

    def _check_supported(self, model: nn.Module) -> None:
        _blocks(model)

    def _insert(self, model: nn.Module) -> nn.Module:
        inner = unwrap(model)
        blocks = _blocks(model)
        dim = _width_of(_mlp(blocks[0]))
        shared = BottleneckAdapter(dim, self.args.width) if self.args.shared_across_blocks else None
        if shared is not None:
            inner.adapter = shared
        for block in blocks:
            adapter = shared if shared is not None else BottleneckAdapter(dim, self.args.width)
            if shared is None:
                block.adapter = adapter
            _mlp(block).register_forward_hook(adapter.after)
        return model

    def _select(self, model: nn.Module) -> Iterable[str]:
        ids = {id(p) for m in unwrap(model).modules() if isinstance(m, BottleneckAdapter) for p in m.parameters()}
        if not ids:
            raise PeftMethodError("the model has no adapters; call AdapterMethod.apply(model) first")
        return [k for k, t in named_tensors(model).items() if id(t) in ids] + head_names(model)


def _blocks(model: nn.Module) -> list[nn.Module]:
    blocks = getattr(unwrap(model), "blocks", None)
    if not isinstance(blocks, (nn.Sequential, nn.ModuleList)) or not all(
            isinstance(getattr(b, "mlp", None), nn.Module) for b in blocks) or len(blocks) == 0:
        raise PeftMethodError(
            f"method 'adapter' needs a transformer with blocks[i].mlp (timm VisionTransformer); "
            f"{type(unwrap(model)).__name__} has none. For CNNs use 'bias', 'lora' or 'head'"
        )
    if hasattr(unwrap(model), "adapter") or any(hasattr(b, "adapter") for b in blocks):
        raise PeftMethodError("the model already has an 'adapter' attribute; apply the adapter method once")
    return list(blocks)


def _mlp(block: nn.Module) -> nn.Module:
    mlp = getattr(block, "mlp", None)
    if not isinstance(mlp, nn.Module):
        raise PeftMethodError(f"block {type(block).__name__} has no mlp module; the adapter goes after it")
    return mlp


def _width_of(mlp: nn.Module) -> int:
    linears = [m for m in mlp.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise PeftMethodError(f"block MLP {type(mlp).__name__} has no nn.Linear; cannot size the adapter")
    return int(linears[-1].out_features)
