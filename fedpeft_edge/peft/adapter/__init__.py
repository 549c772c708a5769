"""Bottleneck adapter tuning."""

from fedpeft_edge.peft.adapter.layer import BottleneckAdapter
from fedpeft_edge.peft.adapter.method import AdapterMethod

__all__ = ["AdapterMethod", "BottleneckAdapter"]
