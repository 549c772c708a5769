"""LoRA via Hugging Face peft."""

from fedpeft_edge.peft.lora.method import LoraMethod

__all__ = ["LoraMethod"]
