"""Reading a training checkpoint's model, whatever layout wrote it, without a process group.

Training writes `run_dir/checkpoints/step_00001000/` (forgeline.train.checkpoint, forgeline.parallel.checkpoint):
its `config.yaml` holds the model config, and the weights are in one of three layouts:

    model.safetensors       one process or DDP: the whole model
    dcp/                    FSDP2 / TP / PP: torch.distributed.checkpoint shards, keyed by the model's own names
    deepspeed/              DeepSpeed ZeRO-3 shards (read with the deepspeed package)

This module names and lists checkpoints, verifies them against their manifests (passing over damaged ones), reads
their weights into one whole model (`load_consolidated_model`, `read_checkpoint`) and finds the tokenizer the run
trained with (`find_run_tokenizer`). A checkpoint of an adapter run (`peft:`) holds the adapters only
(`is_adapter_checkpoint`): reading it as a whole model is one clear error pointing to `forgeline merge`, and
forgeline.recipes.adapted reads it onto its base. Resuming training from a checkpoint is the training packages'
business.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

import torch

from ...errors import CheckpointError, CorruptCheckpointError
from ...files import MANIFEST_NAME, verify_files
from ..config import ModelConfig
from ..transformer import Transformer, build_model
from .common import LoadedModel, allocate_model, fix_rope, load_state_into, parse_dtype, read_safetensors
from .model_dir import WEIGHTS_NAME, load_model_state

CHECKPOINT_PREFIX = "step_"
CORRUPT_SUFFIX = ".corrupt"
DCP_DIR = "dcp"
DEEPSPEED_DIR = "deepspeed"  # also the tag DeepSpeed's own files are saved under inside it
# Where every training run keeps the tokenizer it trains with (written when the run starts).
RUN_TOKENIZER_DIR = "tokenizer"


def print_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def one_line(exc: BaseException) -> str:
    """An exception's message on one line; torch's CheckpointException (a BaseException that prints every rank's
    traceback) is reduced to the first underlying error."""
    from torch.distributed.checkpoint.api import CheckpointException

    if isinstance(exc, CheckpointException) and exc.failures:
        inner = next(iter(exc.failures.values()))
        exc = inner[0] if isinstance(inner, tuple) else inner
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


# ---------------------------------------------------------------------------------------------------------------
# naming, listing, verifying
# ---------------------------------------------------------------------------------------------------------------


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:08d}"


def list_checkpoints(checkpoint_root: Path) -> list[Path]:
    """Checkpoint directories `step_N`, oldest first. Temp directories of interrupted saves and `step_N.corrupt`
    are not listed; a listed one may still be damaged (find_intact_checkpoint verifies)."""
    checkpoint_root = Path(checkpoint_root)
    if not checkpoint_root.is_dir():
        return []
    found = []
    for path in checkpoint_root.iterdir():
        if path.is_dir() and path.name.startswith(CHECKPOINT_PREFIX):
            try:
                found.append((int(path.name[len(CHECKPOINT_PREFIX):]), path))
            except ValueError:
                continue
    return [p for _, p in sorted(found)]


def latest_checkpoint(checkpoint_root: Path) -> Path | None:
    ckpts = list_checkpoints(checkpoint_root)
    return ckpts[-1] if ckpts else None


def _predates_manifests(directory: Path) -> bool:
    """A checkpoint written by a forgeline from before manifests: its meta.json (complete JSON, written just before
    the manifest would be) does not mention one."""
    try:
        meta = json.loads((directory / "meta.json").read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(meta, dict) and "forgeline_version" in meta and "manifest" not in meta


def verify_checkpoint(path: Path) -> None:
    """Raise CorruptCheckpointError when a training checkpoint (any format) is damaged. A missing manifest is damage
    (every save writes it last), except in a checkpoint written before manifests existed, whose safetensors files
    are then checked by header and size."""
    path = Path(path)
    verify_files(path, require_manifest=not (path.is_dir() and not (path / MANIFEST_NAME).is_file()
                                             and _predates_manifests(path)))


def _corrupt_name(path: Path) -> Path:
    target = path.with_name(path.name + CORRUPT_SUFFIX)
    n = 1
    while target.exists():
        target = path.with_name(f"{path.name}.{n}{CORRUPT_SUFFIX}")
        n += 1
    return target


def find_intact_checkpoint(checkpoint_root: Path, *, rename_damaged: bool,
                           report: Callable[[str], None] | None = None) -> tuple[Path | None, list[str]]:
    """The newest checkpoint that verifies, and one line per damaged newer one (each passed to `report`). With
    `rename_damaged`, a damaged checkpoint becomes `step_N.corrupt`, which list_checkpoints and pruning ignore."""
    damaged: list[str] = []
    for ckpt in reversed(list_checkpoints(checkpoint_root)):
        try:
            verify_checkpoint(ckpt)
        except CorruptCheckpointError as exc:
            note = f"checkpoint {ckpt.name} is damaged ({exc.short()})"
            if rename_damaged:
                target = _corrupt_name(ckpt)
                os.replace(ckpt, target)
                note += f"; renamed it {target.name}"
            else:
                note += "; skipped it"
            damaged.append(note)
            if report is not None:
                report(note)
            continue
        return ckpt, damaged
    return None, damaged


def is_sharded_checkpoint(path: Path) -> bool:
    """A checkpoint written by a sharded layout (torch.distributed.checkpoint files under `dcp/`)."""
    return (Path(path) / DCP_DIR / ".metadata").is_file()


def has_model_weights(checkpoint: Path) -> bool:
    """Whether a directory holds a checkpoint's weights in any layout: full (model.safetensors), sharded (dcp/) or
    DeepSpeed (deepspeed/) -- the last two possibly incomplete, which load_consolidated_model reports."""
    checkpoint = Path(checkpoint)
    return ((checkpoint / WEIGHTS_NAME).is_file() or (checkpoint / DCP_DIR).is_dir()
            or (checkpoint / DEEPSPEED_DIR).is_dir())


def looks_like_checkpoint(path: Path) -> bool:
    """A training checkpoint of any layout (its weights possibly missing or broken, which loading reports); a run
    dir also has a config.yaml, but neither weights nor trainer_state.json."""
    path = Path(path)
    return (path / "config.yaml").is_file() and (has_model_weights(path) or (path / "trainer_state.json").is_file())


def is_adapter_checkpoint(checkpoint: Path) -> bool:
    """A checkpoint of an adapter run (`peft:`): its weights are the adapters only and its trainer_state.json names
    the base they belong to (`base`: path, sha256, method); the base is referenced, never copied."""
    try:
        state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(state, dict) and (state.get("weights") == "trainable" or isinstance(state.get("base"), dict))


def refuse_adapter_checkpoint(checkpoint: Path) -> None:
    """The clear error for reading an adapter run's checkpoint as a whole model (its base weights are not in it)."""
    if is_adapter_checkpoint(checkpoint):
        raise CheckpointError(f"{checkpoint} holds adapter weights only (a run with peft:; its base is referenced, "
                              f"not copied): `forgeline merge {checkpoint} --out DIR` makes a whole model of it, and "
                              "forgeline generate, chat and export hf read it as it is")


def resolve_checkpoint_source(source: Path, *, report: Callable[[str], None] | None = print_stderr) -> Path:
    """A checkpoint directory as given, or the newest intact checkpoint of a run dir (`RUN/checkpoints/step_N`) or
    of a checkpoints dir; damaged newer ones are reported and skipped (not renamed: reading changes nothing)."""
    source = Path(source)
    if not source.is_dir():
        raise CheckpointError(f"{source}: no such checkpoint directory")
    if looks_like_checkpoint(source):
        return source
    root = source / "checkpoints" if (source / "checkpoints").is_dir() else source
    if not list_checkpoints(root):
        raise CheckpointError(f"{source} is not a checkpoint (config.yaml + weights), nor a run or checkpoints "
                              f"directory with a {CHECKPOINT_PREFIX}N checkpoint in it")
    found, damaged = find_intact_checkpoint(root, rename_damaged=False, report=report)
    if found is None:
        raise CheckpointError(f"{root} holds no intact checkpoint: {'; '.join(damaged)}")
    return found


# ---------------------------------------------------------------------------------------------------------------
# the model config and the tokenizer of a run
# ---------------------------------------------------------------------------------------------------------------


def _read_run_config(file: Path) -> dict[str, Any]:
    import yaml

    try:
        cfg = yaml.safe_load(file.read_text()) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise CheckpointError(f"{file}: cannot read it ({one_line(exc)})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{file}: expected a mapping of config sections")
    return cfg


def read_checkpoint_model_config(checkpoint: Path) -> ModelConfig:
    """The ModelConfig in a checkpoint's config.yaml; a missing, malformed or invalid file is one CheckpointError."""
    file = Path(checkpoint) / "config.yaml"
    if not file.is_file():
        raise CheckpointError(f"{checkpoint} is not a forgeline checkpoint: config.yaml is missing")
    cfg = _read_run_config(file)
    if not isinstance(cfg.get("model", {}), dict):
        raise CheckpointError(f"{file} has no 'model:' section")
    try:
        return ModelConfig.model_validate(cfg.get("model", {}))
    except ValueError as exc:
        raise CheckpointError(f"{file}: invalid model config ({one_line(exc)})") from None


def _run_dir_of(path: Path) -> Path:
    """The run directory of a checkpoint (`RUN/checkpoints/step_N`), or `path` itself when it is not one."""
    path = Path(path)
    if looks_like_checkpoint(path) and path.parent.name == "checkpoints":
        return path.parent.parent
    return path


def find_run_tokenizer(checkpoint_or_run_dir: Path):
    """The tokenizer a run trained with: `RUN/tokenizer` (every run writes it when it starts), else where older
    runs left or took it: `RUN/model`, the config's `tokenizer:`, the dataset's `tokenizer/`. None if none is
    found."""
    from ...tokenizer import Tokenizer

    path = Path(checkpoint_or_run_dir)
    run_dir = _run_dir_of(path)
    candidates = [run_dir / RUN_TOKENIZER_DIR, path, run_dir / "model"]
    config = path / "config.yaml" if (path / "config.yaml").is_file() else run_dir / "config.yaml"
    run_cfg = _read_run_config(config) if config.is_file() else {}
    if run_cfg.get("tokenizer"):
        candidates.append(Path(run_cfg["tokenizer"]))
    data = run_cfg.get("data")
    if isinstance(data, dict) and data.get("dataset"):
        candidates.append(Path(data["dataset"]) / "tokenizer")
    for candidate in candidates:
        if (candidate / "tokenizer.json").is_file():
            return Tokenizer.load(candidate)
    return None


# ---------------------------------------------------------------------------------------------------------------
# the weights, whole, in one process
# ---------------------------------------------------------------------------------------------------------------


def check_dcp_keys(checkpoint: Path, wanted: dict[str, Any], prefix: str, dcp_dir: Path | None = None) -> None:
    """The clear error for a sharded checkpoint of another model: names missing or of another shape."""
    from torch.distributed.checkpoint import FileSystemReader

    reader = FileSystemReader(str(dcp_dir if dcp_dir is not None else Path(checkpoint) / DCP_DIR))
    metadata = reader.read_metadata().state_dict_metadata
    missing, mismatched = [], []
    for key, value in wanted.items():
        full = f"{prefix}.{key}"
        if full not in metadata:
            missing.append(key)
        elif torch.is_tensor(value) and hasattr(metadata[full], "size") and tuple(metadata[full].size) != tuple(
                value.shape):
            mismatched.append(f"{key} {tuple(metadata[full].size)} -> {tuple(value.shape)}")
    if missing or mismatched:
        raise CheckpointError(
            f"{checkpoint} does not fit this model: missing {missing[:5]}{'...' if len(missing) > 5 else ''}; shapes "
            f"differ for {mismatched[:5]}{'...' if len(mismatched) > 5 else ''}"
        )


def _load_dcp_model(checkpoint: Path, model: Transformer, model_cfg: ModelConfig) -> None:
    """The model part of a sharded checkpoint, read whole into a plain model in this process."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    dcp_dir = checkpoint / DCP_DIR
    if not (dcp_dir / ".metadata").is_file():
        raise CheckpointError(f"{checkpoint} is an incomplete sharded checkpoint: dcp/.metadata is missing")
    sd = {k: v for k, v in model.state_dict().items()}
    if model_cfg.tie_embeddings:
        sd.pop("output.weight", None)
    try:
        check_dcp_keys(checkpoint, sd, "model")
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            dcp.load({"model": sd}, checkpoint_id=str(dcp_dir), no_dist=True)
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as exc:  # CheckpointException is a BaseException
        raise CheckpointError(f"{checkpoint}: cannot read the sharded checkpoint in dcp/ "
                              f"({one_line(exc)})") from None
    model.load_state_dict(sd, strict=not model_cfg.tie_embeddings)


def read_deepspeed_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The fp32 weights of a DeepSpeed checkpoint, under the model's own names (needs the deepspeed package)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=DEEPSPEED_DIR)
    # the backend trains the model inside a loss module, as its `model` attribute
    return {k.removeprefix("model."): v for k, v in state.items()}


def load_consolidated_model(checkpoint: Path, *, verify: bool = True) -> Transformer:
    """The whole fp32 model of a checkpoint of any layout (full safetensors, sharded DCP or DeepSpeed ZeRO-3), in one
    process without a process group. `verify`: check the files against the checkpoint's manifest first."""
    checkpoint = Path(checkpoint)
    model_cfg = read_checkpoint_model_config(checkpoint)
    refuse_adapter_checkpoint(checkpoint)
    if not has_model_weights(checkpoint):
        hint = " (a run dir? give one of its checkpoints/step_N)" if (checkpoint / "checkpoints").is_dir() else ""
        raise CheckpointError(f"{checkpoint} holds no model weights: expected model.safetensors, a sharded dcp/ "
                              f"or a deepspeed/ directory{hint}")
    if verify:
        verify_checkpoint(checkpoint)
    model = build_model(model_cfg, device="meta").to_empty(device="cpu")
    model.init_weights()  # the non-persistent rotary buffer; every weight is overwritten below
    if (checkpoint / DEEPSPEED_DIR).is_dir():
        try:
            state = read_deepspeed_weights(checkpoint)
        except ImportError as exc:
            raise CheckpointError(f"{checkpoint} is a DeepSpeed checkpoint; reading it needs the deepspeed package "
                                  f"({one_line(exc)})") from None
        if model_cfg.tie_embeddings:
            state.pop("output.weight", None)
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [m for m in missing if not (model_cfg.tie_embeddings and m == "output.weight")]
        if missing or unexpected:
            raise CheckpointError(f"{checkpoint} does not fit its config: missing {missing[:5]}, unexpected "
                                  f"{unexpected[:5]}")
    elif is_sharded_checkpoint(checkpoint) or not (checkpoint / WEIGHTS_NAME).is_file():
        _load_dcp_model(checkpoint, model, model_cfg)  # a dcp/ without .metadata is reported there
    else:
        try:
            load_model_state(model, checkpoint / WEIGHTS_NAME)
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(f"{checkpoint / WEIGHTS_NAME}: not a readable safetensors file "
                                  f"({one_line(exc)})") from None
    if model_cfg.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    return model


def read_checkpoint(directory: Path, *, dtype: torch.dtype | str | None = torch.float32,
                    device: str | torch.device = "cpu") -> LoadedModel:
    """A training checkpoint of any layout as a model ready for inference, with the run's tokenizer."""
    directory = Path(directory)
    dtype = parse_dtype(dtype)
    cfg = read_checkpoint_model_config(directory)
    if cfg.vocab_size is None:
        raise CheckpointError(f"{directory / 'config.yaml'}: model.vocab_size is not set")
    refuse_adapter_checkpoint(directory)
    if (directory / WEIGHTS_NAME).is_file():
        verify_checkpoint(directory)
        model = allocate_model(cfg, dtype=dtype, device=device)
        load_state_into(model, read_safetensors(directory / WEIGHTS_NAME, dtype, cfg.tie_embeddings),
                        str(directory / WEIGHTS_NAME))
    else:  # a sharded (DCP) or DeepSpeed checkpoint: gathered whole in this process
        if not has_model_weights(directory):
            raise CheckpointError(f"{directory} is an incomplete checkpoint: no model.safetensors, sharded dcp/ or "
                                  "deepspeed/ weights")
        model = load_consolidated_model(directory)
        if dtype is not None:
            model = model.to(dtype)
        model = fix_rope(model.to(device))
    model.eval()
    # forgeline-trained: documents were separated by BOS/EOS in pre-training, so plain prompts get BOS
    return LoadedModel(model=model, tokenizer=find_run_tokenizer(directory), source=str(directory), add_bos=True)

