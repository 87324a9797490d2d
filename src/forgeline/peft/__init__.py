"""Parameter-efficient fine-tuning: adapters applied to a model as one explicit step, before the parallel layout.

lora.py (LoRA and DoRA, PEFT's format on disk), nf4.py (QLoRA's 4-bit NF4 base), bottleneck.py (Houlsby adapters,
forgeline's format), apply.py (the `peft:` step, merging, adapter directories), load.py (reading them back)."""

from .apply import PeftReport, apply_peft, base_fingerprint, has_adapters, merge_adapters, save_adapter
from .bottleneck import BottleneckAdapter, BottleneckSettings, apply_bottleneck, save_bottleneck_adapter
from .lora import LoraLinear, LoraSettings, apply_lora, load_lora_adapter, lora_state_dict, merge_lora, save_lora_adapter
from .nf4 import NF4Linear, quantize_linear_layers

__all__ = ["BottleneckAdapter", "BottleneckSettings", "LoraLinear", "LoraSettings", "NF4Linear", "PeftReport",
           "apply_bottleneck", "apply_lora", "apply_peft", "base_fingerprint", "has_adapters", "load_lora_adapter",
           "lora_state_dict", "merge_adapters", "merge_lora", "quantize_linear_layers", "save_adapter",
           "save_bottleneck_adapter", "save_lora_adapter"]
