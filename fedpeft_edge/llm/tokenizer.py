"""Tokenizers behind one small interface (`spec.TextTokenizer`): UTF-8 bytes (random-init test models) or a
Hugging Face tokenizer loaded from local files only."""

from __future__ import annotations

from typing import Any

from fedpeft_edge.errors import BackboneError


class ByteTokenizer:
    """UTF-8 bytes as ids 0-255, end of text 256, padding 257: no vocabulary file, same ids everywhere."""

    eos_id = 256
    pad_id = 257
    vocab_size = 258

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A transformers tokenizer or a bare `tokenizers.Tokenizer`; ids without added special tokens for causal
    LMs (documents are joined with the end-of-text id), with them ([CLS] ... [SEP]) for encoders."""

    def __init__(self, tok: Any, add_special_tokens: bool, vocab_size: int | None = None) -> None:
        self.tok = tok
        self.add_special_tokens = add_special_tokens
        if hasattr(tok, "convert_tokens_to_ids"):  # transformers
            eos, pad = tok.eos_token_id, tok.pad_token_id
            size = len(tok)
        else:  # tokenizers.Tokenizer; its file may fix padding/truncation (MiniLM's pads to 128): the datasets pad
            tok.no_padding()
            tok.no_truncation()
            eos = tok.token_to_id("[SEP]")
            pad = tok.token_to_id("[PAD]")
            size = tok.get_vocab_size()
        if eos is None:
            raise BackboneError(f"tokenizer {type(tok).__name__} has no end-of-text token; use a tokenizer with one")
        self.eos_id = int(eos)
        self.pad_id = int(pad if pad is not None else eos)
        self.vocab_size = int(vocab_size or size)

    def encode(self, text: str) -> list[int]:
        if hasattr(self.tok, "convert_tokens_to_ids"):
            return list(self.tok(text, add_special_tokens=self.add_special_tokens)["input_ids"])
        return list(self.tok.encode(text, add_special_tokens=self.add_special_tokens).ids)

    def decode(self, ids: list[int]) -> str:
        return str(self.tok.decode(ids, skip_special_tokens=True))

    def save(self, directory: str) -> None:
        """Write the tokenizer files into `directory` (for an exported model)."""
        if hasattr(self.tok, "save_pretrained"):
            self.tok.save_pretrained(directory)
        else:
            self.tok.save(f"{directory}/tokenizer.json")
