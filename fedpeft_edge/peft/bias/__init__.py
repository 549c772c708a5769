"""Bias tuning."""

from fedpeft_edge.peft.bias.method import BiasMethod

__all__ = ["BiasMethod"]
