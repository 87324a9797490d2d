"""Atomic, pickle-free training checkpoints.

A checkpoint is a directory `checkpoints/step_00001000/`:

    model.safetensors       weights (fp32 master copy), HF-style flat names
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

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .. import __version__
from ..errors import CheckpointError, CorruptCheckpointError

CHECKPOINT_PREFIX = "step_"
CORRUPT_SUFFIX = ".corrupt"
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1
# Files this big are checked by size and header only, when saved and when loaded: hashing a 70B model's shards on
# every save and resume would cost minutes each time, and their sizes and headers catch truncation.
HASH_LIMIT = 2 * 2**30


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


# ---------------------------------------------------------------------------------------------------------------
# manifests and verification
# ---------------------------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 23):
            digest.update(chunk)
    return digest.hexdigest()


def _sha256_many(paths: list[Path]) -> dict[Path, str]:
    # hashlib releases the GIL on large buffers: a sharded checkpoint's files hash in parallel.
    if len(paths) <= 1:
        return {p: _sha256(p) for p in paths}
    with ThreadPoolExecutor(max_workers=min(4, len(paths), os.cpu_count() or 1)) as pool:
        return dict(zip(paths, pool.map(_sha256, paths)))


def _files_under(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.relative_to(directory).as_posix() not in
                  (MANIFEST_NAME, f".{MANIFEST_NAME}.tmp"))


def write_manifest(directory: Path) -> Path:
    """Record every file under `directory` (size, and sha256 below HASH_LIMIT) in `directory/manifest.json`; the
    last step of every save, so a directory whose manifest is missing was never finished."""
    directory = Path(directory)
    files = _files_under(directory)
    sizes = {f: f.stat().st_size for f in files}
    hashes = _sha256_many([f for f in files if sizes[f] < HASH_LIMIT])
    manifest = {"format": MANIFEST_FORMAT, "files": {
        f.relative_to(directory).as_posix(): {"size": sizes[f], "sha256": hashes.get(f)} for f in files}}
    tmp = directory / f".{MANIFEST_NAME}.tmp"
    with open(tmp, "w") as fh:
        fh.write(json.dumps(manifest, indent=1))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, directory / MANIFEST_NAME)
    return directory / MANIFEST_NAME


def check_safetensors_file(path: Path, checkpoint: Path | None = None) -> None:
    """A readable safetensors header whose tensors end exactly at the end of the file (no pickle, no tensor read):
    catches truncation, an empty file and a damaged header without a manifest."""
    path = Path(path)
    where = checkpoint if checkpoint is not None else path.parent
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise CorruptCheckpointError(where, path, f"is too short for a safetensors file ({size} bytes)")
        n = int.from_bytes(head, "little")
        if n < 2 or n > size - 8:
            raise CorruptCheckpointError(where, path, f"has an invalid safetensors header length ({n:,} in a "
                                                      f"{size:,}-byte file): truncated or overwritten")
        raw = fh.read(n)
    try:
        header = json.loads(raw)
        end = 0
        for name, info in header.items():
            if name != "__metadata__":
                begin, stop = (int(x) for x in info["data_offsets"])
                if not 0 <= begin <= stop:
                    raise ValueError(f"{name} has data offsets {begin}..{stop}")
                end = max(end, stop)
    except (ValueError, TypeError, KeyError, AttributeError, UnicodeDecodeError) as exc:
        raise CorruptCheckpointError(where, path, f"has an unreadable safetensors header ({' '.join(str(exc).split())[:120]})"
                                     ) from None
    if 8 + n + end != size:
        raise CorruptCheckpointError(where, path, f"is truncated or overwritten: {size - 8 - n:,} bytes of tensor "
                                                  f"data, its header describes {end:,}")


def _read_manifest(directory: Path) -> dict[str, dict[str, Any]]:
    file = directory / MANIFEST_NAME
    try:
        manifest = json.loads(file.read_text())
        files = manifest["files"]
        if not isinstance(files, dict) or not all(isinstance(e, dict) and isinstance(e.get("size"), int)
                                                  for e in files.values()):
            raise ValueError("malformed 'files'")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise CorruptCheckpointError(directory, file, f"is unreadable ({' '.join(str(exc).split())[:120]})"
                                     ) from None
    return files


def _predates_manifests(directory: Path) -> bool:
    """A checkpoint written by a forgeline from before manifests: its meta.json (complete JSON, written just before
    the manifest would be) does not mention one."""
    try:
        meta = json.loads((directory / "meta.json").read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(meta, dict) and "forgeline_version" in meta and "manifest" not in meta


def verify_files(directory: Path, *, require_manifest: bool = True) -> bool:
    """Check `directory` against its manifest: every listed file present with its size, safetensors headers
    readable, sha256 equal (files under HASH_LIMIT). Raises CorruptCheckpointError naming the first damaged file.

    Without a manifest: an error when `require_manifest`, else only the safetensors files' headers and sizes are
    checked. Returns whether a manifest was checked."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no such directory")
    if not (directory / MANIFEST_NAME).is_file():
        if require_manifest:
            raise CorruptCheckpointError(directory, directory / MANIFEST_NAME,
                                         "is missing: the save never finished (writing it is its last step)")
        for file in _files_under(directory):
            if file.suffix == ".safetensors":
                check_safetensors_file(file, directory)
        return False
    entries = _read_manifest(directory)
    to_hash: dict[Path, str] = {}
    for rel, entry in entries.items():
        file = directory / rel
        if not file.is_file():
            raise CorruptCheckpointError(directory, file, "is missing (listed in the manifest)")
        size = file.stat().st_size
        if size != entry["size"]:
            what = "is empty" if size == 0 else f"has {size:,} bytes"
            raise CorruptCheckpointError(directory, file, f"{what}; the manifest says {entry['size']:,} "
                                                          "(truncated or overwritten)")
        if file.suffix == ".safetensors":
            check_safetensors_file(file, directory)
        if entry.get("sha256") and size < HASH_LIMIT:
            to_hash[file] = entry["sha256"]
    for file, digest in _sha256_many(list(to_hash)).items():
        if digest != to_hash[file]:
            raise CorruptCheckpointError(directory, file, "has changed since it was written (its sha256 differs "
                                                          "from the manifest)")
    return True


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


def print_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


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
        meta = {"forgeline_version": __version__, "git_commit": git_commit(), "saved_at": time.time(), "step": step,
                "manifest": MANIFEST_NAME}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        write_manifest(tmp)
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

    def load(self, path: Path, *, model, optimizer, dist, verify: bool = True) -> dict[str, Any]:
        from ..parallel.checkpoint import refuse_deepspeed_checkpoint

        refuse_deepspeed_checkpoint(path)
        if is_sharded_checkpoint(path):
            from ..parallel.checkpoint import load_sharded_checkpoint

            return load_sharded_checkpoint(path, model=model, optimizer=optimizer, dist=dist, verify=verify)
        return load_checkpoint(path, model=model, optimizer=optimizer, verify=verify)
