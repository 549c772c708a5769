"""Learnable prompt tokens and the hooks that put them into a timm VisionTransformer's token sequence."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class PromptTokens(nn.Module):
    """`tokens` of shape (layers, num_tokens, dim): layer 0 is inserted after the prefix tokens (class and
    register tokens) before the first block; in deep mode layer i replaces the prompt slots before block i.
    After the last block the prompt slots are removed, so pooling and the head see the usual sequence.
    """

    def __init__(self, layers: int, num_tokens: int, dim: int, num_prefix_tokens: int, init_std: float) -> None:
        super().__init__()
        self.tokens = nn.Parameter(torch.zeros(layers, num_tokens, dim))
        nn.init.trunc_normal_(self.tokens, std=init_std, a=-2 * init_std, b=2 * init_std)
        self.num_prefix_tokens = num_prefix_tokens

    def insert(self, x: torch.Tensor) -> torch.Tensor:
        p = self.num_prefix_tokens
        prompt = self.tokens[0].unsqueeze(0).expand(x.shape[0], -1, -1).to(x.dtype)
        return torch.cat([x[:, :p], prompt, x[:, p:]], dim=1)

    def replace(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        p, n = self.num_prefix_tokens, self.tokens.shape[1]
        prompt = self.tokens[layer].unsqueeze(0).expand(x.shape[0], -1, -1).to(x.dtype)
        return torch.cat([x[:, :p], prompt, x[:, p + n:]], dim=1)

    def remove(self, x: torch.Tensor) -> torch.Tensor:
        p, n = self.num_prefix_tokens, self.tokens.shape[1]
        return torch.cat([x[:, :p], x[:, p + n:]], dim=1)


class PromptHook:
    """A block pre-hook (insert or replace) or post-hook (remove). An object rather than a closure so that
    copy.deepcopy of the model re-binds it to the copied PromptTokens."""

    def __init__(self, prompt: PromptTokens, action: str, layer: int = 0) -> None:
        self.prompt, self.action, self.layer = prompt, action, layer

    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: Any = None) -> Any:
        if self.action == "remove":
            return self.prompt.remove(output)
        x = self.prompt.insert(args[0]) if self.action == "insert" else self.prompt.replace(args[0], self.layer)
        return (x, *args[1:])
