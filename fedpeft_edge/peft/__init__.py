"""PEFT methods: one folder per method, one interface (base.PeftMethod), one registry."""

from fedpeft_edge.peft.base import Manifest, PeftMethod, TensorSpec, check_state
from fedpeft_edge.peft.registry import METHODS, MethodRow, build_method, method_table

__all__ = ["METHODS", "Manifest", "MethodRow", "PeftMethod", "TensorSpec", "build_method", "check_state",
           "method_table"]
