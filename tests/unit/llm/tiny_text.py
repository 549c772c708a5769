"""Tiny random-init Llama and BERT configs (built in-process, nothing downloaded) and a fake fortunes tree."""

from __future__ import annotations

from pathlib import Path

from fedpeft_edge.config import ModelArgs

TINY_LLAMA = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "max_position_embeddings": 128}
TINY_BERT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             "max_position_embeddings": 128}


def tiny_lm_args(**kw: object) -> ModelArgs:
    return ModelArgs(model="tiny-llama", family="causal_lm", weights="none", model_kwargs=TINY_LLAMA,
                     **kw)  # type: ignore[arg-type]


def tiny_classifier_args(num_classes: int = 3) -> ModelArgs:
    return ModelArgs(model="tiny-bert", family="text_classifier", weights="none", model_kwargs=TINY_BERT,
                     num_classes=num_classes)


def write_fortunes(root: Path, per_category: int = 30) -> Path:
    """A fortunes-like directory: one file per category, entries separated by `%`, a `.dat` beside each."""
    root.mkdir(parents=True, exist_ok=True)
    words = {"food": "bread cheese soup apple", "computers": "bug kernel byte compile",
             "science": "atom star cell energy"}
    for cat, vocab in words.items():
        entries = [f"{cat} {i}: " + " ".join(vocab.split()[j % 4] for j in range(i, i + 6))
                   for i in range(per_category)]
        (root / cat).write_text("\n%\n".join(entries) + "\n%\n", encoding="utf-8")
        (root / f"{cat}.dat").write_bytes(b"\0")
    (root / "notes.txt").write_text("not a fortune file")
    return root
