"""`load_model(path)`: whatever a path holds, as a model ready for inference (`forgeline generate`, `chat`,
`export hf`, a stage's `init:`)."""

from __future__ import annotations

from pathlib import Path

import torch

from ...errors import CheckpointError
from .checkpoint import list_checkpoints, looks_like_checkpoint, read_checkpoint, resolve_checkpoint_source
from .common import HF_CONFIG, LoadedModel, parse_dtype
from .gguf import load_gguf
from .hf import load_hf
from .model_dir import CONFIG_NAME, is_model_dir, read_model_dir

__all__ = ["load_model"]


def load_model(
    path: str | Path,
    *,
    dtype: torch.dtype | str | None = torch.float32,
    device: str | torch.device = "cpu",
) -> LoadedModel:
    """Load whatever `path` is: a forgeline model dir, a Hugging Face dir, a .gguf file, a training checkpoint
    (`run_dir/checkpoints/step_N`, any layout) or a run dir (its `model/`, else its newest intact checkpoint)."""
    path = Path(path)
    dtype = parse_dtype(dtype)
    if path.is_file():
        if path.suffix.lower() == ".gguf" or _is_gguf(path):
            return load_gguf(path, dtype=dtype, device=device)
        raise CheckpointError(f"{path}: a file, but not a GGUF file; give a model directory or a .gguf file")
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if is_model_dir(path):
        return read_model_dir(path, dtype=dtype, device=device)
    if (path / HF_CONFIG).is_file():
        return load_hf(path, dtype=dtype, device=device)
    if looks_like_checkpoint(path):
        return read_checkpoint(path, dtype=dtype, device=device)
    if is_model_dir(path / "model"):
        return read_model_dir(path / "model", dtype=dtype, device=device)
    if list_checkpoints(path / "checkpoints"):
        return read_checkpoint(resolve_checkpoint_source(path), dtype=dtype, device=device)
    for adapter in (path, path / "adapter"):
        if (adapter / "adapter_config.json").is_file():
            raise CheckpointError(f"{adapter} is an adapter directory (adapter_config.json), not a whole model: "
                                  f"`forgeline merge {adapter} --out DIR` makes one of it with its base, and "
                                  "forgeline generate, chat and export hf read it as it is")
    raise CheckpointError(
        f"{path} is not a checkpoint: expected a forgeline model dir ({CONFIG_NAME}), a Hugging Face dir "
        f"({HF_CONFIG} + safetensors), a training checkpoint (config.yaml + model.safetensors, or a sharded dcp/ "
        "or deepspeed/ checkpoint), a run dir or a .gguf file"
    )


def _is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False
