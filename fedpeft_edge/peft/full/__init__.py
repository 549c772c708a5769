"""Full fine-tuning."""

from fedpeft_edge.peft.full.method import FullMethod

__all__ = ["FullMethod"]
