"""Head tuning."""

from fedpeft_edge.peft.head.method import HeadMethod

__all__ = ["HeadMethod"]
