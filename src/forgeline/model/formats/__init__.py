"""Models on disk, by format: Hugging Face directories (hf.py), GGUF files (gguf.py), forgeline's own model
directory (model_dir.py), training checkpoints of any layout (checkpoint.py); `load_model` reads whichever a path
is (load.py)."""

from .common import LoadedModel, describe
from .load import load_model

__all__ = ["LoadedModel", "describe", "load_model"]
