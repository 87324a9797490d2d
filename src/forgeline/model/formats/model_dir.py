"""forgeline's own model directory: the hand-off between stages (pre-training -> SFT -> alignment -> evaluation)
and what `forgeline import` makes of a Hugging Face directory or a GGUF file.

    model.safetensors        the weights, flat forgeline names (a tied output projection stored once, as the embedding;
                             a reward model's score head as score.weight, with no output projection)
    forgeline_config.json    the ModelConfig (head=score and pad_token_id for a reward model)
    tokenizer.json, tokenizer_config.json
    generation_config.json   generation defaults with Hugging Face keys: an imported model's own, plus the ids of
                             extra end-of-sequence tokens (`generation_eos`: a chat template's end of turn)
    hf_config.json           an imported Hugging Face model's config.json: `export hf` restores its architecture and
                             the fields forgeline does not model (e.g. Mistral's sliding_window)
    import.json              where an imported model came from
    manifest.json            every other file's size and sha256, written last

`save_model_dir` is the one writer and `read_model_dir` the one reader. The directory is built beside its target
and renamed into place; the reader checks it against its manifest first. A directory without one (written before
manifests, or by an older `forgeline import`) is checked by its safetensors headers and sizes only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ...errors import CheckpointError, ConfigError
from ...files import atomic_directory, verify_files, write_manifest
from .common import (
    GENERATION_CONFIG,
    LoadedModel,
    allocate_model,
    architecture_of,
    architecture_with_head,
    load_state_into,
    model_config_from,
    parse_dtype,
    read_json,
    read_safetensors,
    save_file,
)

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "is_model_dir", "load_model_state", "model_state_dict", "read_model_dir",
           "save_imported", "save_model_dir"]

CONFIG_NAME = "forgeline_config.json"
WEIGHTS_NAME = "model.safetensors"
SOURCE_HF_CONFIG = "hf_config.json"
IMPORT_INFO = "import.json"


def model_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Flat, contiguous, de-duplicated weights: a tied output projection is stored once (as the embedding)."""
    seen: dict[int, str] = {}
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        key = id(tensor) if tensor.data_ptr() == 0 else tensor.data_ptr()
        if key in seen and tensor.numel() > 0:
            continue
        seen[key] = name
        out[name] = tensor.detach().contiguous().cpu()
    return out


def has_frozen_parameters(model: torch.nn.Module) -> bool:
    """Whether part of the model is a frozen base (adapters train, the rest is loaded from the base each run)."""
    return any(not p.requires_grad for p in model.parameters())


def trainable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Only the weights that train: what a checkpoint of an adapter run holds (the base is referenced, not copied)."""
    return {name: p.detach().contiguous().cpu() for name, p in model.named_parameters() if p.requires_grad}


def load_model_state(model: torch.nn.Module, path: Path, *, trainable_only: bool = False) -> None:
    """model_state_dict's file back into `model` (whose tied output projection needs no tensor of its own); with
    `trainable_only`, trainable_state_dict's (every trainable weight, no frozen one)."""
    from safetensors.torch import load_file

    state = load_file(str(path))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"output.weight"} if getattr(getattr(model, "cfg", None), "tie_embeddings", False) else set()
    if trainable_only:
        tied |= {name for name, p in model.named_parameters() if not p.requires_grad}
        tied |= {name for name, _ in model.named_buffers()}
    missing = [m for m in missing if m not in tied]
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not fit this model: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )


def is_model_dir(path: Path) -> bool:
    return (Path(path) / CONFIG_NAME).is_file()


def _generation_config(tokenizer, base: dict[str, Any] | None, extra_eos: list[str] | None) -> dict[str, Any]:
    gen = dict(base or {})
    if not extra_eos:
        return gen
    if tokenizer is None:
        raise ConfigError(f"end-of-sequence tokens {extra_eos} need a tokenizer to map them to ids")
    eos = gen.get("eos_token_id", tokenizer.eos_id)
    ids = [int(e) for e in eos] if isinstance(eos, list) else ([] if eos is None else [int(eos)])
    for token in extra_eos:
        token_id = tokenizer.token_to_id(token)
        if token_id is None:
            raise ConfigError(f"end-of-sequence token {token!r} is not in the tokenizer's vocabulary")
        if token_id not in ids:
            ids.append(token_id)
    gen["eos_token_id"] = ids
    if tokenizer.bos_id is not None:
        gen.setdefault("bos_token_id", tokenizer.bos_id)
    if tokenizer.pad_token is not None:
        gen.setdefault("pad_token_id", tokenizer.pad_id)
    return gen


def save_model_dir(
    model: torch.nn.Module,
    tokenizer,
    out: str | Path,
    *,
    overwrite: bool = False,
    generation_eos: list[str] | None = None,
    generation_config: dict[str, Any] | None = None,
    hf_config: dict[str, Any] | None = None,
    imported_from: str | None = None,
) -> Path:
    """Write a model directory (see the module docstring); an existing non-empty `out` is replaced only with
    `overwrite`. generation_eos: tokens (strings) whose ids join the generation config's eos_token_id list, so
    that generation stops on them. generation_config / hf_config / imported_from: an imported model's own.
    Weights are streamed to disk, so peak memory stays at one model."""
    out = Path(out)
    gen = _generation_config(tokenizer, generation_config, generation_eos)  # a bad token fails before any write
    with atomic_directory(out, overwrite=overwrite, what="model directory") as tmp:
        save_file(model_state_dict(model), tmp / WEIGHTS_NAME, metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(model.cfg.model_dump(mode="json"), indent=1))
        if tokenizer is not None:
            tokenizer.save(tmp)
        if gen:
            (tmp / GENERATION_CONFIG).write_text(json.dumps(gen, indent=2) + "\n")
        if hf_config:
            (tmp / SOURCE_HF_CONFIG).write_text(json.dumps(hf_config, indent=2) + "\n")
        if imported_from is not None:
            (tmp / IMPORT_INFO).write_text(json.dumps({"source": imported_from}, indent=1) + "\n")
        write_manifest(tmp)
    return out


def save_imported(loaded: LoadedModel, out: str | Path, *, overwrite: bool = False) -> Path:
    """`forgeline import`: a model loaded from another format, with its generation defaults and source config."""
    return save_model_dir(loaded.model, loaded.tokenizer, out, overwrite=overwrite,
                          generation_config=loaded.generation_config, hf_config=loaded.hf_config,
                          imported_from=loaded.source or "")


def read_model_dir(directory: str | Path, *, dtype: torch.dtype | str | None = None,
                   device: str | torch.device = "cpu") -> LoadedModel:
    """A model directory, checked against its manifest, in `dtype` (None: as stored) on `device`."""
    from ...tokenizer import Tokenizer

    directory = Path(directory)
    cfg_path = directory / CONFIG_NAME
    if not cfg_path.is_file():
        raise CheckpointError(f"{directory} is not a forgeline model directory: {CONFIG_NAME} is missing")
    dtype = parse_dtype(dtype)
    has_manifest = verify_files(directory, require_manifest=False)
    cfg = model_config_from(read_json(cfg_path), cfg_path)
    model = allocate_model(cfg, dtype=dtype, device=device)
    load_state_into(model, read_safetensors(directory / WEIGHTS_NAME, dtype, cfg.tie_embeddings),
                    str(directory / WEIGHTS_NAME))
    model.eval()
    tokenizer = Tokenizer.load(directory) if (directory / "tokenizer.json").is_file() else None
    gen = read_json(directory / GENERATION_CONFIG) if (directory / GENERATION_CONFIG).is_file() else {}
    hf = read_json(directory / SOURCE_HF_CONFIG) if (directory / SOURCE_HF_CONFIG).is_file() else None
    # An imported model keeps its tokenizer's own BOS rule; one trained here prepends BOS as pre-training did. An
    # older `import gguf` left no import.json but a generation config and no manifest; no older trained model has a
    # generation config.
    imported = (directory / IMPORT_INFO).is_file() or hf is not None or bool(gen and not has_manifest)
    return LoadedModel(model=model, tokenizer=tokenizer, generation_config=gen,
                       architecture=architecture_with_head(architecture_of(hf), cfg.head) if hf else None,
                       hf_config=hf, source=str(directory),
                       add_bos=None if imported else True)
