"""Sharded checkpoints with torch.distributed.checkpoint (DCP), resharding on load, and consolidation.

A sharded checkpoint is a directory `checkpoints/step_00001000/`:

    dcp/                    model and optimizer, each rank writing its own shards (`.metadata` + `*.distcp`);
                            keys are the model's own parameter names (`model.layers.3.attention.wq.weight`, the
                            optimizer flattened per parameter: `optim.state.<name>.exp_avg`), whatever the layout
    rng/rank_00003.*        the torch / python / numpy generator states of every rank
    trainer_state.json      step, data position, schedule, stability state, the layout it was saved under
    config.yaml, meta.json  as for full checkpoints
    manifest.json           size and sha256 of every file above, written last

Saving is collective and atomic: rank 0 creates a hidden temp directory, every rank writes into it, and after a
barrier rank 0 writes the manifest, fsyncs the directory and renames it into place. Every load verifies the files
against the manifest first (train/checkpoint.py: verify_checkpoint). Loading asks the *current* model and optimizer for their state
dicts (DTensor shards of this layout, or plain tensors on one process) and lets DCP read exactly those pieces, so
a checkpoint saved on N ranks with one layout resumes on M ranks with another, or on a single process; and a full
(safetensors) checkpoint of a single-process or DDP run resumes under a sharded layout.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from .. import __version__
from ..errors import CheckpointError, ForgelineError
from ..train.checkpoint import (
    CHECKPOINT_PREFIX,
    MANIFEST_NAME,
    _fsync_dir,
    find_intact_checkpoint,
    git_commit,
    is_sharded_checkpoint,
    list_checkpoints,
    print_stderr,
    rng_state,
    set_rng_state,
    verify_checkpoint,
    write_manifest,
)
from ..train.distributed import barrier


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(flatten_optimizer_state_dict=True, **kw)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _fsync_files(root: Path) -> None:
    for file in root.rglob("*"):
        if file.is_file():
            with open(file, "rb") as fh:
                os.fsync(fh.fileno())
    for d in [root, *[p for p in root.rglob("*") if p.is_dir()]]:
        _fsync_dir(d)


def begin_multirank_save(checkpoint_root: Path, step: int, dist) -> tuple[Path, Path]:
    """(final, tmp) paths of checkpoint `step`; rank 0 makes a fresh tmp directory (with rng/) that every rank
    writes its part into. Call collectively."""
    checkpoint_root = Path(checkpoint_root)
    final = checkpoint_root / f"{CHECKPOINT_PREFIX}{step:08d}"
    tmp = checkpoint_root / f".tmp-{CHECKPOINT_PREFIX}{step:08d}"
    if dist.is_main:
        checkpoint_root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        (tmp / "rng").mkdir(parents=True)
    barrier()
    return final, tmp


def write_rank_and_run_state(tmp: Path, step: int, fmt: str, layout: str, trainer_state: dict, config_yaml: str,
                             dist) -> None:
    """Every rank's RNG state; on rank 0 also the trainer state, the resolved config and meta.json."""
    tensors, meta = rng_state()
    save_file(tensors, str(tmp / "rng" / f"rank_{dist.rank:05d}.safetensors"))
    (tmp / "rng" / f"rank_{dist.rank:05d}.json").write_text(json.dumps(meta))
    if dist.is_main:
        state = dict(trainer_state, step=step, format=fmt, layout=layout)
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
        (tmp / "config.yaml").write_text(config_yaml)
        meta = {"forgeline_version": __version__, "git_commit": git_commit(), "saved_at": time.time(),
                "step": step, "format": fmt, "layout": layout, "world_size": dist.world_size,
                "manifest": MANIFEST_NAME}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))


def finish_multirank_save(tmp: Path, final: Path, checkpoint_root: Path, keep_last: int, dist) -> Path:
    """Once every rank has written: the manifest, fsync, rename into place, prune old checkpoints. Call
    collectively."""
    barrier()  # every rank's part is written
    if dist.is_main:
        write_manifest(tmp)
        _fsync_files(tmp)
        if final.exists():  # a re-save of the same step after a rollback
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(Path(checkpoint_root))
        for old in list_checkpoints(Path(checkpoint_root))[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()  # nobody reads it before it is in place
    return final


class ShardedCheckpointer:
    """Checkpoints for FSDP2 / TP / PP layouts (see the module docstring)."""

    def __init__(self, layout_description: str = ""):
        self.layout_description = layout_description

    def save(self, checkpoint_root: Path, step: int, *, model, optimizer, trainer_state, config_yaml, keep_last,
             dist) -> Path:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        final, tmp = begin_multirank_save(checkpoint_root, step, dist)
        try:
            # get_state_dict creates the state of an optimizer that has not stepped yet with a zero-lr step, which
            # counts as Adam's first step: save it as "not stepped" and give the optimizer its empty state back.
            fresh = optimizer is not None and not optimizer.state
            model_sd, optim_sd = get_state_dict(model, optimizer, options=_options())
            if fresh:
                optim_sd = {k: torch.zeros_like(v) if k.endswith(".step") and torch.is_tensor(v) else v
                            for k, v in optim_sd.items()}
                optimizer.state.clear()
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / "dcp"))
            write_rank_and_run_state(tmp, step, "dcp", self.layout_description, trainer_state, config_yaml, dist)
        except BaseException:
            if dist.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        return finish_multirank_save(tmp, final, checkpoint_root, keep_last, dist)

    def load(self, path: Path, *, model, optimizer, dist, verify: bool = True) -> dict[str, Any]:
        refuse_deepspeed_checkpoint(path)
        if is_sharded_checkpoint(path):
            return load_sharded_checkpoint(path, model=model, optimizer=optimizer, dist=dist, verify=verify)
        return load_full_checkpoint_into_sharded(path, model=model, optimizer=optimizer, dist=dist, verify=verify)


def refuse_deepspeed_checkpoint(path: Path) -> None:
    if (Path(path) / "deepspeed").is_dir():
        raise CheckpointError(f"{path} was written by the DeepSpeed backend; resume it with parallel.backend="
                              "deepspeed on the same number of ranks, or export its weights with "
                              "`forgeline export consolidate` and start a new run from them")


def _read_state(path: Path) -> dict[str, Any]:
    file = Path(path) / "trainer_state.json"
    if not file.is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint: trainer_state.json is missing")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{file} is not valid JSON: {exc}") from None


def _restore_rng(path: Path, rank: int) -> None:
    rng_dir = Path(path) / "rng"
    own = rng_dir / f"rank_{rank:05d}.safetensors"
    file = own if own.is_file() else rng_dir / "rank_00000.safetensors"  # resumed on more ranks than saved
    if file.is_file():
        set_rng_state(load_file(str(file)), json.loads(file.with_suffix(".json").read_text()))


def _check_keys(path: Path, wanted: dict[str, Any], prefix: str, dcp_dir: Path | None = None) -> None:
    """The clear error for a checkpoint of another model: names missing or of another shape."""
    from torch.distributed.checkpoint import FileSystemReader

    reader = FileSystemReader(str(dcp_dir if dcp_dir is not None else Path(path) / "dcp"))
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
            f"{path} does not fit this model: missing {missing[:5]}{'...' if len(missing) > 5 else ''}; shapes "
            f"differ for {mismatched[:5]}{'...' if len(mismatched) > 5 else ''}"
        )


def load_sharded_checkpoint(path: Path, *, model, optimizer, dist, verify: bool = True) -> dict[str, Any]:
    """Read a DCP checkpoint into this rank's model and optimizer, whatever layout either was saved or is run in
    (a plain model on one process included); returns the trainer state. `verify`: check the files against the
    manifest first (every rank reads them all, so a rank that did not would be reading unchecked bytes)."""
    path = Path(path)
    if verify:
        verify_checkpoint(path)
    state = _read_state(path)
    _load_dcp(path / "dcp", model=model, optimizer=optimizer)
    _restore_rng(path, _rank())
    return state


# Implementation switches of the optimizer, not training state: a checkpoint saved with fused AdamW (plain tensors)
# must not turn it on for DTensor parameters, which have no fused kernel, or the other way round.
_IMPLEMENTATION_FLAGS = ("fused", "foreach", "capturable", "differentiable")


def _load_dcp(dcp_dir: Path, *, model, optimizer) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer, options=_options())
    _check_keys(dcp_dir.parent if dcp_dir.name == "dcp" else dcp_dir, model_sd, "model", dcp_dir=dcp_dir)
    to_load: dict[str, Any] = {"model": model_sd}
    if optimizer is not None:
        to_load["optim"] = optim_sd
        flags = [{k: g[k] for k in _IMPLEMENTATION_FLAGS if k in g} for g in optimizer.param_groups]
    dcp.load(to_load, checkpoint_id=str(dcp_dir))
    set_state_dict(model, optimizer if optimizer is not None else [], model_state_dict=model_sd,
                   optim_state_dict=optim_sd if optimizer is not None else {}, options=_options())
    if optimizer is not None:
        for group, saved in zip(optimizer.param_groups, flags):
            group.update(saved)


def full_checkpoint_as_dcp(path: Path, out: Path, model_cfg) -> None:
    """Rewrite a full (safetensors) checkpoint's model and optimizer as a one-process DCP checkpoint in `out`, keyed
    like sharded checkpoints (optimizer states by parameter name, not by position)."""
    import torch.distributed.checkpoint as dcp

    from ..model import build_model
    from ..train.optim import param_groups

    path = Path(path)
    for name in ("model.safetensors", "optimizer.safetensors", "trainer_state.json"):
        if not (path / name).is_file():
            raise CheckpointError(f"{path} is not a complete checkpoint: {name} is missing")
    state = _read_state(path)
    model_sd = load_file(str(path / "model.safetensors"))
    if model_cfg.tie_embeddings and "output.weight" not in model_sd:  # a tied table is stored once
        model_sd["output.weight"] = model_sd["tok_embeddings.weight"]
    # Full checkpoints number optimizer states by the parameter's position in the whole model's param groups; a meta
    # copy of the whole model gives the position -> name map.
    meta = build_model(model_cfg, device="meta")
    names = {id(p): n for n, p in meta.named_parameters()}
    order = [names[id(p)] for g in param_groups(meta, 0.0) for p in g["params"]]
    optim_sd: dict[str, Any] = {}
    for key, value in load_file(str(path / "optimizer.safetensors")).items():
        _, idx, name = key.split(".", 2)
        optim_sd[f"state.{order[int(idx)]}.{name}"] = value
    opt_meta = state["optimizer"]
    for idx, scalars in opt_meta.get("scalars", {}).items():
        for name, value in scalars.items():
            optim_sd[f"state.{order[int(idx)]}.{name}"] = value
    for group in opt_meta["param_groups"]:
        for idx in group["params"]:
            for hyper, value in group.items():
                if hyper != "params":
                    optim_sd[f"param_groups.{order[int(idx)]}.{hyper}"] = tuple(value) if hyper == "betas" else value
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(out), no_dist=True)


def load_full_checkpoint_into_sharded(path: Path, *, model, optimizer, dist, verify: bool = True
                                      ) -> dict[str, Any]:
    """A full (safetensors) checkpoint of a single-process or DDP run, into a sharded model: rank 0 rewrites it as a
    DCP checkpoint beside it, and every rank reads its own pieces from that (the same resharding path as always)."""
    path = Path(path)
    if verify:
        verify_checkpoint(path)
    converted = path.parent / f".tmp-dcp-{path.name}"
    if dist.is_main:
        if converted.exists():
            shutil.rmtree(converted)
        try:
            full_checkpoint_as_dcp(path, converted, model_cfg_of(model))
        except BaseException:
            shutil.rmtree(converted, ignore_errors=True)
            raise
    barrier()
    try:
        _load_dcp(converted, model=model, optimizer=optimizer)
    finally:
        barrier()
        if dist.is_main:
            shutil.rmtree(converted, ignore_errors=True)
    state = _read_state(path)
    if (path / "rng.safetensors").is_file():
        set_rng_state(load_file(str(path / "rng.safetensors")), state["rng"])
    return state


def model_cfg_of(model):
    cfg = getattr(model, "cfg", None)
    if cfg is None:
        raise CheckpointError("the model has no `cfg`: cannot map a full checkpoint onto it")
    return cfg


# ---------------------------------------------------------------------------------------------------------------
# consolidation: sharded checkpoint -> one safetensors model directory
# ---------------------------------------------------------------------------------------------------------------


def _one_line(exc: BaseException) -> str:
    """An exception's message on one line; torch's CheckpointException (a BaseException that prints every rank's
    traceback) is reduced to the first underlying error."""
    from torch.distributed.checkpoint.api import CheckpointException

    if isinstance(exc, CheckpointException) and exc.failures:
        inner = next(iter(exc.failures.values()))
        exc = inner[0] if isinstance(inner, tuple) else inner
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def has_model_weights(checkpoint: Path) -> bool:
    """Whether a directory holds a checkpoint's weights in any layout: full (model.safetensors), sharded (dcp/) or
    DeepSpeed (deepspeed/) -- the last two possibly incomplete, which load_consolidated_model reports."""
    checkpoint = Path(checkpoint)
    return ((checkpoint / "model.safetensors").is_file() or (checkpoint / "dcp").is_dir()
            or (checkpoint / "deepspeed").is_dir())


def read_checkpoint_model_config(checkpoint: Path):
    """The ModelConfig in a checkpoint's config.yaml; a missing, malformed or invalid file is one CheckpointError."""
    import yaml

    from ..model import ModelConfig

    file = Path(checkpoint) / "config.yaml"
    if not file.is_file():
        raise CheckpointError(f"{checkpoint} is not a forgeline checkpoint: config.yaml is missing")
    try:
        cfg = yaml.safe_load(file.read_text()) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise CheckpointError(f"{file}: cannot read it ({_one_line(exc)})") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model", {}), dict):
        raise CheckpointError(f"{file} has no 'model:' section")
    try:
        return ModelConfig.model_validate(cfg.get("model", {}))
    except ValueError as exc:
        raise CheckpointError(f"{file}: invalid model config ({_one_line(exc)})") from None


def _load_dcp_model(checkpoint: Path, model, model_cfg) -> None:
    """The model part of a sharded checkpoint, read whole into a plain model in this process."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    dcp_dir = checkpoint / "dcp"
    if not (dcp_dir / ".metadata").is_file():
        raise CheckpointError(f"{checkpoint} is an incomplete sharded checkpoint: dcp/.metadata is missing")
    sd = {k: v for k, v in model.state_dict().items()}
    if model_cfg.tie_embeddings:
        sd.pop("output.weight", None)
    try:
        _check_keys(checkpoint, sd, "model")
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            dcp.load({"model": sd}, checkpoint_id=str(dcp_dir), no_dist=True)
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as exc:  # CheckpointException is a BaseException
        raise CheckpointError(f"{checkpoint}: cannot read the sharded checkpoint in dcp/ "
                              f"({_one_line(exc)})") from None
    model.load_state_dict(sd, strict=not model_cfg.tie_embeddings)


def load_consolidated_model(checkpoint: Path, *, verify: bool = True):
    """The whole fp32 model of a checkpoint of any layout (full safetensors, sharded DCP or DeepSpeed ZeRO-3), in one
    process without a process group. `verify`: check the files against the checkpoint's manifest first."""
    from ..model import build_model
    from ..train.checkpoint import load_model_state

    checkpoint = Path(checkpoint)
    model_cfg = read_checkpoint_model_config(checkpoint)
    if not has_model_weights(checkpoint):
        hint = " (a run dir? give one of its checkpoints/step_N)" if (checkpoint / "checkpoints").is_dir() else ""
        raise CheckpointError(f"{checkpoint} holds no model weights: expected model.safetensors, a sharded dcp/ "
                              f"or a deepspeed/ directory{hint}")
    if verify:
        verify_checkpoint(checkpoint)
    model = build_model(model_cfg, device="meta").to_empty(device="cpu")
    model.init_weights()  # the non-persistent rotary buffer; every weight is overwritten below
    if (checkpoint / "deepspeed").is_dir():
        try:
            from .deepspeed import consolidate_deepspeed_state

            state = consolidate_deepspeed_state(checkpoint)
        except ImportError as exc:
            raise CheckpointError(f"{checkpoint} is a DeepSpeed checkpoint; reading it needs the deepspeed package "
                                  f"({_one_line(exc)})") from None
        if model_cfg.tie_embeddings:
            state.pop("output.weight", None)
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [m for m in missing if not (model_cfg.tie_embeddings and m == "output.weight")]
        if missing or unexpected:
            raise CheckpointError(f"{checkpoint} does not fit its config: missing {missing[:5]}, unexpected "
                                  f"{unexpected[:5]}")
    elif is_sharded_checkpoint(checkpoint) or not (checkpoint / "model.safetensors").is_file():
        _load_dcp_model(checkpoint, model, model_cfg)  # a dcp/ without .metadata is reported there
    else:
        try:
            load_model_state(model, checkpoint / "model.safetensors")
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(f"{checkpoint / 'model.safetensors'}: not a readable safetensors file "
                                  f"({_one_line(exc)})") from None
    if model_cfg.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    return model


def resolve_checkpoint_source(source: Path, *, report=print_stderr) -> Path:
    """A checkpoint directory as given, or the newest intact checkpoint of a run dir (`RUN/checkpoints/step_N`) or
    of a checkpoints dir; damaged newer ones are reported and skipped (not renamed: reading changes nothing)."""
    source = Path(source)
    if not source.is_dir():
        raise CheckpointError(f"{source}: no such checkpoint directory")
    if (source / "config.yaml").is_file() and (has_model_weights(source) or (source / "trainer_state.json").is_file()):
        return source
    root = source / "checkpoints" if (source / "checkpoints").is_dir() else source
    if not list_checkpoints(root):
        raise CheckpointError(f"{source} is not a checkpoint (config.yaml + weights), nor a run or checkpoints "
                              f"directory with a {CHECKPOINT_PREFIX}N checkpoint in it")
    found, damaged = find_intact_checkpoint(root, rename_damaged=False, report=report)
    if found is None:
        raise CheckpointError(f"{root} holds no intact checkpoint: {'; '.join(damaged)}")
    return found


def consolidate(checkpoint: Path, output: Path, *, tokenizer_dir: Path | None = None, overwrite: bool = False
                ) -> Path:
    """Write a forgeline model directory (model.safetensors + config [+ tokenizer]) from a checkpoint of any layout,
    or from the newest intact checkpoint of a run dir or checkpoints dir. An existing non-empty `output` is
    replaced only with `overwrite`."""
    import yaml

    from ..model.pretrained import save_pretrained

    output = Path(output)
    if output.exists() and not overwrite and (not output.is_dir() or any(output.iterdir())):
        raise ForgelineError(f"{output} already exists; pass --overwrite to replace it, or choose another output")
    checkpoint = resolve_checkpoint_source(Path(checkpoint))
    model = load_consolidated_model(checkpoint)
    cfg = yaml.safe_load((checkpoint / "config.yaml").read_text()) or {}
    tokenizer = None
    if tokenizer_dir is None and cfg.get("tokenizer"):
        tokenizer_dir = Path(cfg["tokenizer"])
    if tokenizer_dir is None and cfg.get("data", {}).get("dataset"):
        candidate = Path(cfg["data"]["dataset"]) / "tokenizer"
        tokenizer_dir = candidate if candidate.is_dir() else None
    if tokenizer_dir is not None and Path(tokenizer_dir).is_dir():
        from ..tokenizer import Tokenizer

        tokenizer = Tokenizer.load(tokenizer_dir)
    return save_pretrained(model, tokenizer, output)
