"""The decoder, its configuration and presets."""

from .config import PRESETS, ModelConfig, RopeScaling, num_params, training_flops_per_token
from .transformer import KVCache, Transformer, build_attention_mask, build_model

__all__ = [
    "PRESETS",
    "KVCache",
    "ModelConfig",
    "RopeScaling",
    "Transformer",
    "build_attention_mask",
    "build_model",
    "num_params",
    "training_flops_per_token",
]
