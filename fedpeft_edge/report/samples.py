"""Held-out prompts answered by the base model and by the federated one: what a person reads in the report.

`answer_prompts(cfg, run_dir)` builds the backbone once, takes the first words of a held-out document per
category as prompts, and greedily continues each with the method's initial state (the base model: LoRA's B is
zero) and with the last checkpoint's global state; the rows go to `<run_dir>/llm_samples.json`, which the run
report shows as a table.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedpeft_edge.config import RunConfig
from fedpeft_edge.llm.spec import TextTokenizer

log = logging.getLogger(__name__)

SAMPLES_FILE = "llm_samples.json"


@torch.no_grad()
def greedy_continue(model: nn.Module, tokenizer: TextTokenizer, prompt: str, max_new_tokens: int = 24) -> str:
    """The model's greedy continuation of `prompt` (a CausalLM wrapper: logits (B*T, V)), up to end of text."""
    was = model.training
    model.eval()
    ids = tokenizer.encode(prompt)
    out: list[int] = []
    try:
        for _ in range(max_new_tokens):
            logits = model(torch.tensor([ids + out], dtype=torch.long))
            nxt = int(logits[-1].argmax())
            if nxt == tokenizer.eos_id:
                break
            out.append(nxt)
    finally:
        model.train(was)
    return tokenizer.decode(out)


def held_out_prompts(cfg: RunConfig, words: int = 6) -> list[tuple[str, str]]:
    """(category, first `words` words) of the first held-out document of each category of the run's source."""
    from fedpeft_edge.data import load_source

    src = load_source(cfg.data_args)
    texts = src.test.texts or ()
    out = []
    for c, name in enumerate(src.class_names):
        for label, text in zip(src.test.labels, texts, strict=True):
            if int(label) == c and len(text.split()) > words:
                out.append((name, " ".join(text.split()[:words])))
                break
    return out


def answer_prompts(cfg: RunConfig, run_dir: str | Path, max_new_tokens: int = 24) -> list[dict[str, Any]]:
    """Rows {category, prompt, base, federated} for the run's held-out prompts, written to llm_samples.json."""
    from fedpeft_edge.backbone import build_backbone
    from fedpeft_edge.peft import build_method
    from fedpeft_edge.server.checkpoint import load_checkpoint

    torch.manual_seed(cfg.common_args.random_seed)
    backbone = build_backbone(cfg.model_args)
    tokenizer = backbone.data_config.tokenizer  # type: ignore[union-attr]
    method = build_method(cfg.peft_args)
    model = method.apply(backbone.model)
    base_state = method.get_state(model)
    final = load_checkpoint(run_dir)
    prompts = held_out_prompts(cfg)
    rows: list[dict[str, Any]] = [{"category": c, "prompt": p} for c, p in prompts]
    for key, state in (("base", base_state), (f"federated (round {final.round})", final.state)):
        method.set_state(model, state)
        for row in rows:
            row[key] = greedy_continue(model, tokenizer, row["prompt"], max_new_tokens)
    Path(run_dir, SAMPLES_FILE).write_text(json.dumps(rows, indent=1, ensure_ascii=False), encoding="utf-8")
    return rows
