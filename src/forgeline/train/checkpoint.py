"""Atomic, pickle-free training checkpoints.

A checkpoint is a directory `checkpoints/step_00001000/`:

    model.safetensors       weights (fp32 master copy), HF-style flat names
    optimizer.safetensors   optimizer tensors (`state.<param index>.<name>`)
    rng.safetensors         torch CPU/CUDA generator states
    trainer_state.json      step, data position, schedule, stability state, optimizer hyperparameters, python/numpy RNG
    config.yaml             the fully resolved run config
    meta.json               forgeline version, git commit, time

It is written into a hidden temp directory, every file fsynced, and renamed into place: a directory named
`step_*` is always complete, so `--resume` can trust the newest one. Nothing is read back through pickle.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .. import __version__
from ..errors import CheckpointError

CHECKPOINT_PREFIX = "step_"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for file in path.iterdir():
        if file.is_file():
            with open(file, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(path)


def git_commit() -> str | None:
    """The commit of the forgeline source tree, when it is a git checkout (None for an installed wheel)."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


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


def load_model_state(model: torch.nn.Module, path: Path) -> None:
    state = load_file(str(path))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"output.weight"} if getattr(getattr(model, "cfg", None), "tie_embeddings", False) else set()
    missing = [m for m in missing if m not in tied]
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not fit this model: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )


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
    """Write `checkpoint_root/step_<step>` atomically and prune to the newest `keep_last`; returns its path."""
    checkpoint_root.mkdir(parents=True, exist_ok=True)
    final = checkpoint_root / f"{CHECKPOINT_PREFIX}{step:08d}"
    tmp = checkpoint_root / f".tmp-{CHECKPOINT_PREFIX}{step:08d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        save_file(model_state_dict(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        opt_tensors, opt_meta = _optimizer_to_tensors(optimizer)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        rng_tensors, rng_meta = rng_state()
        save_file(rng_tensors, str(tmp / "rng.safetensors"))
        state = dict(trainer_state, step=step, optimizer=opt_meta, rng=rng_meta)
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
        (tmp / "config.yaml").write_text(config_yaml)
        meta = {"forgeline_version": __version__, "git_commit": git_commit(), "saved_at": time.time(), "step": step}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        _fsync_tree(tmp)
        if final.exists():  # a re-save of the same step after a rollback
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(checkpoint_root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(checkpoint_root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(checkpoint_root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temp directories of interrupted saves are ignored)."""
    if not checkpoint_root.is_dir():
        return []
    found = []
    for path in checkpoint_root.iterdir():
        if path.is_dir() and path.name.startswith(CHECKPOINT_PREFIX) and (path / "trainer_state.json").is_file():
            try:
                found.append((int(path.name[len(CHECKPOINT_PREFIX):]), path))
            except ValueError:
                continue
    return [p for _, p in sorted(found)]


def latest_checkpoint(checkpoint_root: Path) -> Path | None:
    ckpts = list_checkpoints(checkpoint_root)
    return ckpts[-1] if ckpts else None


def load_checkpoint(path: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """Restore weights, optimizer and RNG in place; returns the trainer state (step, data position, ...)."""
    for name in ("model.safetensors", "trainer_state.json"):
        if not (path / name).is_file():
            raise CheckpointError(f"{path} is not a complete checkpoint: {name} is missing")
    try:
        state = json.loads((path / "trainer_state.json").read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path / 'trainer_state.json'} is not valid JSON: {exc}") from None
    load_model_state(model, path / "model.safetensors")
    if optimizer is not None:
        _optimizer_from_tensors(optimizer, load_file(str(path / "optimizer.safetensors")), state["optimizer"])
    if (path / "rng.safetensors").is_file():
        set_rng_state(load_file(str(path / "rng.safetensors")), state["rng"])
    return state


def is_sharded_checkpoint(path: Path) -> bool:
    """A checkpoint written by a sharded layout (torch.distributed.checkpoint files under `dcp/`)."""
    return (Path(path) / "dcp" / ".metadata").is_file()


class FullCheckpointer:
    """Whole-model layouts (one process, DDP): rank 0 writes the safetensors checkpoint above; every rank reads.

    A sharded (DCP) checkpoint from an FSDP2 / TP / PP run is read too, resharded into this whole model.
    """

    def save(self, checkpoint_root: Path, step: int, *, model, optimizer, trainer_state, config_yaml, keep_last,
             dist) -> Path | None:
        from .distributed import barrier

        path = None
        if dist.is_main:
            path = save_checkpoint(checkpoint_root, step, model=model, optimizer=optimizer,
                                   trainer_state=trainer_state, config_yaml=config_yaml, keep_last=keep_last)
        barrier()  # nobody reads a checkpoint before rank 0 has renamed it into place
        return path

    def load(self, path: Path, *, model, optimizer, dist) -> dict[str, Any]:
        from ..parallel.checkpoint import refuse_deepspeed_checkpoint

        refuse_deepspeed_checkpoint(path)
        if is_sharded_checkpoint(path):
            from ..parallel.checkpoint import load_sharded_checkpoint

            return load_sharded_checkpoint(path, model=model, optimizer=optimizer, dist=dist)
        return load_checkpoint(path, model=model, optimizer=optimizer)
