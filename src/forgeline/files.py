"""Atomic writes: a directory or file on disk is either complete or absent, never half-written.

Every artifact forgeline writes (checkpoints, model directories, Hugging Face exports, token shards, tokenizers)
is built in a hidden sibling (same filesystem, so the final rename is atomic), fsynced, and renamed into place. A
crash or SIGKILL at any point leaves the old artifact, or none, plus a hidden temp directory that later saves
ignore or remove. This module is the one place that knows how.

A rename is only as good as the disk under it, though: a file can still be cut short (a full disk on a network
filesystem, a copy that stopped) or changed later. So the last file a save writes is `manifest.json`, every other
file's size and sha256 (`write_manifest`), and readers check a directory against it first (`verify_files`).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .errors import CheckpointError, CorruptCheckpointError, ForgelineError

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1
# Files this big are checked by size and header only, when saved and when loaded: hashing a 70B model's shards on
# every save and resume would cost minutes each time, and their sizes and headers catch truncation.
HASH_LIMIT = 2 * 2**30


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in `path` durable (POSIX needs the directory itself fsynced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """fsync every file below `path`, then every directory bottom-up."""
    dirs = []
    for root, _, names in os.walk(path):
        dirs.append(Path(root))
        for name in names:
            with open(Path(root) / name, "rb") as fh:
                os.fsync(fh.fileno())
    for d in reversed(dirs):
        fsync_dir(d)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def sibling_dir(path: Path, tag: str) -> Path:
    """A new hidden directory beside `path`, with the permissions the user's umask asks for (unlike mkdtemp's
    owner-only 0700, which a published artifact would otherwise inherit)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        candidate = path.parent / f".{path.name}.{tag}-{secrets.token_hex(4)}"
        try:
            candidate.mkdir(mode=0o777 & ~_umask())
            return candidate
        except FileExistsError:
            continue


def check_target(target: Path, *, overwrite: bool, what: str = "output") -> None:
    """Refuse to replace an existing, non-empty `target` unless `overwrite`; never replace a file by a directory."""
    if target.exists():
        if not target.is_dir():
            raise ForgelineError(f"{what} {target} exists and is not a directory")
        if not overwrite and any(target.iterdir()):
            raise ForgelineError(f"{what} {target} exists and is not empty (pass --overwrite to replace it)")


def publish_dir(tmp: Path, target: Path) -> None:
    """Rename the finished `tmp` to `target`. An existing target is moved aside first and deleted only after the
    new one is in place, so some complete version is always there."""
    fsync_tree(tmp)
    old = None
    if target.exists():
        old = sibling_dir(target, "old")
        old.rmdir()
        os.replace(target, old)
    os.replace(tmp, target)
    fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_directory(target: str | os.PathLike, *, overwrite: bool = False, what: str = "output") -> Iterator[Path]:
    """`with atomic_directory(out) as tmp:` write into `tmp`; on a clean exit it becomes `out`, on an exception it
    is removed and `out` is untouched."""
    target = Path(target)
    check_target(target, overwrite=overwrite, what=what)
    tmp = sibling_dir(target, "tmp")
    try:
        yield tmp
        publish_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{secrets.token_hex(4)}"
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


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
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.relative_to(directory).as_posix() !=
                  MANIFEST_NAME)


def write_manifest(directory: Path) -> Path:
    """Record every file under `directory` (size, and sha256 below HASH_LIMIT) in `directory/manifest.json`; the
    last step of every save, so a directory whose manifest is missing was never finished."""
    directory = Path(directory)
    files = _files_under(directory)
    sizes = {f: f.stat().st_size for f in files}
    hashes = _sha256_many([f for f in files if sizes[f] < HASH_LIMIT])
    manifest = {"format": MANIFEST_FORMAT, "files": {
        f.relative_to(directory).as_posix(): {"size": sizes[f], "sha256": hashes.get(f)} for f in files}}
    atomic_write_text(directory / MANIFEST_NAME, json.dumps(manifest, indent=1))
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
