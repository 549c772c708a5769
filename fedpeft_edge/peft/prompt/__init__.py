"""Visual prompt tuning."""

from fedpeft_edge.peft.prompt.layer import PromptTokens
from fedpeft_edge.peft.prompt.method import PromptMethod

__all__ = ["PromptMethod", "PromptTokens"]
