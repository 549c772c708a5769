"""Write a merged Llama-family causal LM as a GGUF file (F32 tensors) for llama.cpp, with the `gguf` package.

The architecture keys come from the model's config; the tokenizer keys (`tokenizer.*`) are copied from the GGUF
the base was loaded from, when there is one (a model without them still loads, but llama.cpp needs them to
tokenise). Tensor names follow llama.cpp's (gguf.TensorNameMap); q and k projections are permuted to llama.cpp's
rotary layout, as its converter does (transformers' GGUF loader undoes exactly that, which the parity check of
`export.py` relies on).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedpeft_edge.errors import ExportError


def write_llama_gguf(lm: nn.Module, path: Path, source_gguf: Path | None = None) -> Path:
    """Write `lm` (a transformers LlamaForCausalLM, LoRA merged) to `path` as an all-F32 GGUF."""
    import gguf

    cfg: Any = getattr(lm, "config", None)
    if cfg is None or getattr(cfg, "model_type", None) != "llama":
        raise ExportError(f"GGUF export writes Llama-family models; this one is {getattr(cfg, 'model_type', None)!r}")
    n_head, n_kv = int(cfg.num_attention_heads), int(cfg.num_key_value_heads or cfg.num_attention_heads)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("fedpeft-edge merged model")
    w.add_block_count(int(cfg.num_hidden_layers))
    w.add_context_length(int(cfg.max_position_embeddings))
    w.add_embedding_length(int(cfg.hidden_size))
    w.add_feed_forward_length(int(cfg.intermediate_size))
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_freq_base(float(getattr(cfg, "rope_theta", None) or _rope_theta(cfg)))
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_vocab_size(int(cfg.vocab_size))
    w.add_rope_dimension_count(int(cfg.hidden_size) // n_head)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    if source_gguf is not None:
        _copy_tokenizer(gguf.GGUFReader(str(source_gguf)), w)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, int(cfg.num_hidden_layers))
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    for hf_name, tensor in lm.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp reuses token_embd when there is no output tensor
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ExportError(f"no GGUF name for tensor {hf_name}; this Llama variant is not supported")
        data = tensor.detach().float()
        if hf_name.endswith("q_proj.weight"):
            data = _permute(data, n_head, n_head)
        elif hf_name.endswith("k_proj.weight"):
            data = _permute(data, n_head, n_kv)
        w.add_tensor(name, data.contiguous().numpy())
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
    except OSError as exc:
        raise ExportError(f"cannot write {path}: {exc}") from exc
    finally:
        w.close()
    return path


def _rope_theta(cfg: Any) -> float:
    params = getattr(cfg, "rope_parameters", None) or {}
    return float(params.get("rope_theta", 10000.0)) if isinstance(params, dict) else 10000.0


def _permute(w: torch.Tensor, n_head: int, n_head_kv: int) -> torch.Tensor:
    """llama.cpp's rotary layout for q/k weights (convert_hf_to_gguf.LlamaModel.permute)."""
    if n_head_kv != n_head:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _copy_tokenizer(reader: Any, w: Any) -> None:
    import gguf

    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        kind = field.types[0]
        value = field.contents()
        if kind == gguf.GGUFValueType.ARRAY:
            w.add_key_value(key, value, kind, sub_type=field.types[-1])
        else:
            w.add_key_value(key, value, kind)
