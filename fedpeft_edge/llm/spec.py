"""What a text backbone takes as input: its tokenizer, its task and the sequence length."""

from __future__ import annotations

import dataclasses
from typing import Literal, Protocol

TextTask = Literal["causal_lm", "text_classifier"]


class TextTokenizer(Protocol):
    """The few things the project asks of a tokenizer (a byte tokenizer for tests, an HF one otherwise)."""

    eos_id: int
    pad_id: int
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


@dataclasses.dataclass(frozen=True)
class TextSpec:
    """The text counterpart of `backbone.InputSpec`: how a device turns its text into model inputs."""

    tokenizer: TextTokenizer
    task: TextTask
    vocab_size: int
