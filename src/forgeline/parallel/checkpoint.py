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
barrier rank 0 writes the manifest and publishes the directory (forgeline.files: fsync, rename into place). Every
load verifies the files against the manifest first (forgeline.model.formats.checkpoint: verify_checkpoint). Loading
asks the *current* model and optimizer for their state dicts (DTensor shards of this layout, or plain tensors on one
process) and lets DCP read exactly those pieces, so a checkpoint saved on N ranks with one layout resumes on M ranks
with another, or on a single process; and a full (safetensors) checkpoint of a single-process or DDP run resumes
under a sharded layout (ShardedCheckpointer), as a sharded one does under a whole-model layout
(WholeModelCheckpointer). Reading a checkpoint's weights without a process group, and consolidating them into a
model directory, is forgeline.model.formats.checkpoint's part; `consolidate` here adds the run's tokenizer.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError, ForgelineError
from ..files import publish_dir, write_manifest
from ..model.formats.checkpoint import (
    DEEPSPEED_DIR,
    check_dcp_keys,
    checkpoint_name,
    find_run_tokenizer,
    is_sharded_checkpoint,
    load_consolidated_model,
    resolve_checkpoint_source,
    verify_checkpoint,
)
from ..train.checkpoint import FullCheckpointer, checkpoint_meta, prune_checkpoints, rng_state, set_rng_state
from ..train.distributed import barrier


def _options(model=None, **kw):
    """With a frozen base (adapters), only the trained weights are saved and loaded: the base comes from `init`
    on every run (and its hash is checked against the checkpoint's trainer_state.json)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    from ..model.formats.model_dir import has_frozen_parameters

    if model is not None and has_frozen_parameters(model):
        kw.update(ignore_frozen_params=True, strict=False)
    return StateDictOptions(flatten_optimizer_state_dict=True, **kw)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def begin_multirank_save(checkpoint_root: Path, step: int, dist) -> tuple[Path, Path]:
    """(final, tmp) paths of checkpoint `step`; rank 0 makes a fresh tmp directory (with rng/) that every rank
    writes its part into. Call collectively."""
    checkpoint_root = Path(checkpoint_root)
    final = checkpoint_root / checkpoint_name(step)
    # every rank must know the directory without a message from rank 0: a fixed name, cleared by rank 0 first
    tmp = checkpoint_root / f".{final.name}.tmp-ranks"
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
        meta = checkpoint_meta(step, format=fmt, layout=layout, world_size=dist.world_size)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))


def finish_multirank_save(tmp: Path, final: Path, checkpoint_root: Path, keep_last: int, dist) -> Path:
    """Once every rank has written: the manifest, fsync, rename into place, prune old checkpoints. Call
    collectively."""
    barrier()  # every rank's part is written
    if dist.is_main:
        write_manifest(tmp)
        publish_dir(tmp, final)  # replaces a save of the same step (after a rollback)
        prune_checkpoints(Path(checkpoint_root), keep_last)
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
            model_sd, optim_sd = get_state_dict(model, optimizer, options=_options(model))
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


class WholeModelCheckpointer(FullCheckpointer):
    """Whole-model layouts (one process, DDP): safetensors checkpoints as FullCheckpointer writes and reads them,
    and a sharded (DCP) checkpoint of an FSDP2 / TP / PP run read too, resharded into this whole model."""

    def load(self, path: Path, *, model, optimizer, dist, verify: bool = True) -> dict[str, Any]:
        refuse_deepspeed_checkpoint(path)
        if is_sharded_checkpoint(path):
            return load_sharded_checkpoint(path, model=model, optimizer=optimizer, dist=dist, verify=verify)
        return super().load(path, model=model, optimizer=optimizer, dist=dist, verify=verify)


def refuse_deepspeed_checkpoint(path: Path) -> None:
    if (Path(path) / DEEPSPEED_DIR).is_dir():
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

    model_sd, optim_sd = get_state_dict(model, optimizer, options=_options(model))
    check_dcp_keys(dcp_dir.parent if dcp_dir.name == "dcp" else dcp_dir, model_sd, "model", dcp_dir=dcp_dir)
    to_load: dict[str, Any] = {"model": model_sd}
    if optimizer is not None:
        to_load["optim"] = optim_sd
        flags = [{k: g[k] for k in _IMPLEMENTATION_FLAGS if k in g} for g in optimizer.param_groups]
    dcp.load(to_load, checkpoint_id=str(dcp_dir))
    set_state_dict(model, optimizer if optimizer is not None else [], model_state_dict=model_sd,
                   optim_state_dict=optim_sd if optimizer is not None else {}, options=_options(model))
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


def consolidate(checkpoint: Path, output: Path, *, tokenizer_dir: Path | None = None, overwrite: bool = False,
                generation_eos: list[str] | None = None) -> Path:
    """Write a forgeline model directory from a checkpoint of any layout, or from the newest intact checkpoint of a
    run dir or checkpoints dir. The tokenizer: `tokenizer_dir`, else the run's (find_run_tokenizer).
    generation_eos: as for save_model_dir. An existing non-empty `output` is replaced only with `overwrite`."""
    from ..model.formats.model_dir import save_model_dir
    from ..tokenizer import Tokenizer

    output = Path(output)
    if output.exists() and not overwrite and (not output.is_dir() or any(output.iterdir())):
        raise ForgelineError(f"{output} already exists; pass --overwrite to replace it, or choose another output")
    checkpoint = resolve_checkpoint_source(Path(checkpoint))
    model = load_consolidated_model(checkpoint)
    tokenizer = Tokenizer.load(tokenizer_dir) if tokenizer_dir is not None else find_run_tokenizer(checkpoint)
    return save_model_dir(model, tokenizer, output, overwrite=overwrite, generation_eos=generation_eos)
