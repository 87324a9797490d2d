"""Atomic writes: a directory or file on disk is either complete or absent, never half-written.

Every artifact forgeline writes (checkpoints, model directories, Hugging Face exports, token shards, tokenizers)
is built in a hidden sibling (same filesystem, so the final rename is atomic), fsynced, and renamed into place. A
crash or SIGKILL at any point leaves the old artifact, or none, plus a hidden temp directory that later saves
ignore or remove. This module is the one place that knows how.
"""

from __future__ import annotations

import os
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import ForgelineError


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
