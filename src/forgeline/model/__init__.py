"""The decoder, its configuration and presets; models on disk (`formats`) and running them (`inference`)."""

from .config import PRESETS, ModelConfig, RopeScaling, num_params, training_flops_per_token
from .formats import LoadedModel, load_model
from .transformer import KVCache, Transformer, build_attention_mask, build_model

__all__ = [
    "PRESETS",
    "KVCache",
    "LoadedModel",
    "ModelConfig",
    "RopeScaling",
    "Transformer",
    "build_attention_mask",
    "build_model",
    "load_model",
    "num_params",
    "training_flops_per_token",
]
