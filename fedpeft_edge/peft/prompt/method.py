"""Visual prompt tuning (VPT) for timm VisionTransformer: learnable tokens per layer (deep) or once (shallow);
prompt tuning of a text backbone's input embeddings (shallow: the backbone prepends the tokens, fedpeft_edge/llm)."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from fedpeft_edge.backbone import named_tensors, unwrap
from fedpeft_edge.config import PromptArgs
from fedpeft_edge.errors import PeftMethodError
from fedpeft_edge.peft.base import PeftMethod, head_names
from fedpeft_edge.peft.prompt.layer import PromptHook, PromptTokens

_MODULE = "prompt"


class PromptMethod(PeftMethod):
    """Prompt tokens as `prompt.tokens` (layers x num_tokens x dim) plus the head; hooks on the blocks.

    Deep with 10 tokens on ViT-B/16: 12 x 10 x 768 = 92,160 + head = 169,060 parameters for 100 classes.
    """

    name = "prompt"

    def __init__(self, args: PromptArgs | None = None) -> None:
        self.args = args or PromptArgs()
        if self.args.num_tokens <= 0:
            raise PeftMethodError(f"peft_args.prompt.num_tokens must be > 0, got {self.args.num_tokens}")
        if self.args.init_std <= 0:
            raise PeftMethodError(f"peft_args.prompt.init_std must be > 0, got {self.args.init_std}")

    def describe(self) -> str:
        return f"tokens={self.args.num_tokens} depth={self.args.depth}"

    def _check_supported(self, model: nn.Module) -> None:
        from timm.models.vision_transformer import VisionTransformer

        inner = unwrap(model)
        if getattr(inner, "accepts_soft_prompt", False):  # a text backbone (fedpeft_edge/llm): input prompt only
            if self.args.depth != "shallow":
                raise PeftMethodError(f"method 'prompt' on {type(inner).__name__} is prompt tuning of the input "
                                      "embeddings; set peft_args.prompt.depth: shallow")
            if hasattr(inner, _MODULE):
                raise PeftMethodError(f"the model already has a {_MODULE!r} attribute; apply the prompt method once")
            return
        if not isinstance(inner, VisionTransformer):
            raise PeftMethodError(
                f"method 'prompt' (visual prompt tuning) needs a timm VisionTransformer; got "
                f"{type(inner).__name__}. For CNNs use 'bias', 'lora' or 'head'"
            )
        if hasattr(inner, _MODULE):
            raise PeftMethodError(f"the model already has a {_MODULE!r} attribute; apply the prompt method once")

    def _insert(self, model: nn.Module) -> nn.Module:
        inner = unwrap(model)
        if getattr(inner, "accepts_soft_prompt", False):  # the backbone prepends `prompt.tokens[0]` itself
            dim = int(inner.get_input_embeddings().embedding_dim)  # type: ignore[operator]
            prompt = PromptTokens(1, self.args.num_tokens, dim, 0, self.args.init_std)
            setattr(inner, _MODULE, prompt.to(next(inner.parameters()).device))
            return model
        blocks = list(inner.blocks)  # type: ignore[arg-type]
        layers = len(blocks) if self.args.depth == "deep" else 1
        prompt = PromptTokens(layers, self.args.num_tokens, int(inner.embed_dim),  # type: ignore[arg-type]
                              int(inner.num_prefix_tokens), self.args.init_std)  # type: ignore[arg-type]
        prompt.to(next(inner.parameters()).device)
        setattr(inner, _MODULE, prompt)
        blocks[0].register_forward_pre_hook(PromptHook(prompt, "insert"))
        for i in range(1, layers):
            blocks[i].register_forward_pre_hook(PromptHook(prompt, "replace", i))
        blocks[-1].register_forward_hook(PromptHook(prompt, "remove"))
        return model

    def _select(self, model: nn.Module) -> Iterable[str]:
        prompt = getattr(unwrap(model), _MODULE, None)
        if not isinstance(prompt, PromptTokens):
            raise PeftMethodError("the model has no prompt tokens; call PromptMethod.apply(model) first")
        token_id = id(prompt.tokens)
        return [k for k, t in named_tensors(model).items() if id(t) == token_id] + head_names(model)
