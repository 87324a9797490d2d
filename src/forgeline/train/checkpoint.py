"""Atomic, pickle-free training checkpoints.

A checkpoint is a directory `checkpoints/step_00001000/`:

    model.safetensors       weights (fp32 master copy), HF-style flat names; with a frozen base (adapters) only
                            the trained weights, and trainer_state.json's `base` names the base (path, sha256)
    optimizer.safetensors   optimizer tensors (`state.<param index>.<name>`)
    rng.safetensors         torch CPU/CUDA generator states
    trainer_state.json      step, data position, schedule, stability state, optimizer hyperparameters, python/numpy RNG
    config.yaml             the fully resolved run config
    meta.json               forgeline version, git commit, time
    manifest.json           every other file's size and sha256, written last

It is written into a hidden temp directory, every file fsynced, and renamed into place. A rename is only as good as
the disk under it, though: a file can still be cut short (a full disk on a network filesystem, a copy that stopped)
or changed later. So every load first checks the files against the manifest (`verify_checkpoint`), and `--resume`
passes over a damaged checkpoint to the newest intact one, renaming the damaged one `step_N.corrupt`. Nothing is
read back through pickle.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .. import __version__
from ..errors import CheckpointError
from ..files import MANIFEST_NAME, atomic_directory, write_manifest
from ..model.formats.checkpoint import (
    DCP_DIR,
    DEEPSPEED_DIR,
    checkpoint_name,
    find_intact_checkpoint,
    list_checkpoints,
    verify_checkpoint,
)
from ..model.formats.model_dir import has_frozen_parameters, load_model_state, model_state_dict, trainable_state_dict


def git_commit() -> str | None:
    """The commit of the forgeline source tree, when it is a git checkout (None for an installed wheel)."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def select_checkpoint(checkpoint_root: Path, dist, *, report: Callable[[str], None] | None = None
                      ) -> tuple[Path | None, list[str]]:
    """find_intact_checkpoint on rank 0 (which renames damaged checkpoints), its answer on every rank. Collective."""
    import torch.distributed as torch_dist

    answer: list[Any] = [None, []]
    if dist.is_main:
        found, damaged = find_intact_checkpoint(checkpoint_root, rename_damaged=True, report=report)
        answer = [None if found is None else str(found), damaged]
    if torch_dist.is_initialized() and torch_dist.get_world_size() > 1:
        torch_dist.broadcast_object_list(answer, src=0)
    return (None if answer[0] is None else Path(answer[0])), answer[1]


def _optimizer_to_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"state.{idx}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_from_tensors(optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = value
    for idx, values in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(values)
    groups = [dict(g, betas=tuple(g["betas"])) if "betas" in g else g for g in meta["param_groups"]]
    if len(groups) != len(optimizer.param_groups) or any(
        len(a["params"]) != len(b["params"]) for a, b in zip(groups, optimizer.param_groups)
    ):
        raise CheckpointError("the checkpoint's optimizer has a different parameter layout than this model")
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["torch_cuda"] = torch.cuda.get_rng_state()
    py = random.getstate()
    np_state = np.random.get_state()
    return tensors, {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    if "torch_cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["torch_cuda"])
    py = meta["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npst = meta["numpy"]
    np.random.set_state((npst[0], np.array(npst[1], dtype=np.uint32), npst[2], npst[3], npst[4]))


def save_checkpoint(
    checkpoint_root: Path,
    step: int,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    config_yaml: str,
    keep_last: int,
) -> Path:
    """Write `checkpoint_root/step_<step>` atomically and prune to the newest `keep_last`; returns its path. A
    re-save of the same step (after a rollback) replaces it."""
    final = Path(checkpoint_root) / checkpoint_name(step)
    with atomic_directory(final, overwrite=True, what="checkpoint") as tmp:
        trainable_only = has_frozen_parameters(model)
        weights = trainable_state_dict(model) if trainable_only else model_state_dict(model)
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        opt_tensors, opt_meta = _optimizer_to_tensors(optimizer)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        rng_tensors, rng_meta = rng_state()
        save_file(rng_tensors, str(tmp / "rng.safetensors"))
        state = dict(trainer_state, step=step, optimizer=opt_meta, rng=rng_meta,
                     weights="trainable" if trainable_only else "all")
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
        (tmp / "config.yaml").write_text(config_yaml)
        (tmp / "meta.json").write_text(json.dumps(checkpoint_meta(step), indent=1))
        write_manifest(tmp)
    prune_checkpoints(final.parent, keep_last)
    return final


def checkpoint_meta(step: int, **extra: Any) -> dict[str, Any]:
    """meta.json: who wrote the checkpoint; naming the manifest tells a reader that one was written last."""
    return {"forgeline_version": __version__, "git_commit": git_commit(), "saved_at": time.time(), "step": step,
            **extra, "manifest": MANIFEST_NAME}


def prune_checkpoints(checkpoint_root: Path, keep_last: int) -> None:
    for old in list_checkpoints(checkpoint_root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(path: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    verify: bool = True) -> dict[str, Any]:
    """Restore weights, optimizer and RNG in place; returns the trainer state (step, data position, ...). `verify`
    checks the files against the manifest first (pass False only for a checkpoint just verified)."""
    path = Path(path)
    if verify:
        verify_checkpoint(path)
    for name in ("model.safetensors", "trainer_state.json"):
        if not (path / name).is_file():
            raise CheckpointError(f"{path} is not a complete checkpoint: {name} is missing")
    try:
        state = json.loads((path / "trainer_state.json").read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path / 'trainer_state.json'} is not valid JSON: {exc}") from None
    load_model_state(model, path / "model.safetensors", trainable_only=state.get("weights") == "trainable")
    if optimizer is not None:
        _optimizer_from_tensors(optimizer, load_file(str(path / "optimizer.safetensors")), state["optimizer"])
    if (path / "rng.safetensors").is_file():
        set_rng_state(load_file(str(path / "rng.safetensors")), state["rng"])
    return state


class FullCheckpointer:
    """Whole-model checkpoints in safetensors (above): rank 0 writes, every rank reads. Reading the checkpoints of
    sharded layouts into a whole model is forgeline.parallel.checkpoint.WholeModelCheckpointer's part."""

    def save(self, checkpoint_root: Path, step: int, *, model, optimizer, trainer_state, config_yaml, keep_last,
             dist) -> Path | None:
        from .distributed import barrier

        path = None
        if dist.is_main:
            path = save_checkpoint(checkpoint_root, step, model=model, optimizer=optimizer,
                                   trainer_state=trainer_state, config_yaml=config_yaml, keep_last=keep_last)
        barrier()  # nobody reads a checkpoint before rank 0 has renamed it into place
        return path

    def load(self, path: Path, *, model, optimizer, dist, verify: bool = True) -> dict[str, Any]:
        for sub in (DCP_DIR, DEEPSPEED_DIR):
            if (Path(path) / sub).is_dir():
                raise CheckpointError(f"{path} holds {sub}/ shards, not a whole-model checkpoint; resume it with "
                                      "the layout's own checkpointer (forgeline.parallel.checkpoint)")
        return load_checkpoint(path, model=model, optimizer=optimizer, verify=verify)
