"""Parameter-efficient fine-tuning: adapters applied to a model as one explicit step, before the parallel layout.

Today: LoRA (lora.py). DoRA, QLoRA (NF4 base weights) and bottleneck adapters, and their wiring into the stage
configs (`peft:`), are the next steps (issue 10)."""

from .lora import LoraLinear, LoraSettings, apply_lora, lora_state_dict, merge_lora, save_lora_adapter

__all__ = ["LoraLinear", "LoraSettings", "apply_lora", "lora_state_dict", "merge_lora", "save_lora_adapter"]
