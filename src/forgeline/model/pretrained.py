"""A trained model on disk: `model.safetensors` + `forgeline_config.json` + the tokenizer files.

This is the hand-off between stages (pre-training -> SFT -> alignment -> evaluation). Hugging Face format export is
a separate command; this directory is forgeline's own, readable with any safetensors reader. `save_pretrained` ends
with a `manifest.json` (each file's size and sha256) that `load_pretrained` checks; a directory without one (older,
or written by `forgeline import`) is checked by its safetensors headers and sizes only.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError
from .config import ModelConfig
from .transformer import Transformer, build_model

CONFIG_NAME = "forgeline_config.json"
WEIGHTS_NAME = "model.safetensors"


def save_pretrained(model: Transformer, tokenizer, directory: str | Path) -> Path:
    """Write atomically (temp dir + rename): an interrupted save never leaves a directory that looks complete."""
    from ..train.checkpoint import model_state_dict, write_manifest

    directory = Path(directory)
    tmp = directory.with_name(f".tmp-{directory.name}-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        save_file(model_state_dict(model), str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(model.cfg.model_dump(mode="json"), indent=1))
        if tokenizer is not None:
            tokenizer.save(tmp)
        write_manifest(tmp)
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def load_pretrained(directory: str | Path, *, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None) -> Transformer:
    from ..train.checkpoint import verify_files

    directory = Path(directory)
    cfg_path = directory / CONFIG_NAME
    if not cfg_path.is_file():
        raise CheckpointError(f"{directory} is not a forgeline model directory: {CONFIG_NAME} is missing")
    verify_files(directory, require_manifest=False)
    try:
        cfg = ModelConfig.model_validate(json.loads(cfg_path.read_text()))
    except (json.JSONDecodeError, ValueError) as exc:
        raise CheckpointError(f"{cfg_path}: invalid model config: {exc}") from None
    model = build_model(cfg, device="meta")
    model = model.to_empty(device=device)
    model.init_weights()  # fills the non-persistent rotary buffer; the weights are overwritten below
    from ..train.checkpoint import load_model_state

    load_model_state(model, directory / WEIGHTS_NAME)
    if cfg.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    return model.to(dtype) if dtype is not None else model
