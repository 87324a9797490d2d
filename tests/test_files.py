"""The one atomic-write helper: complete or absent, never half-written; refuses to clobber without overwrite."""

import os

import pytest

from forgeline.errors import ForgelineError
from forgeline.files import atomic_directory, atomic_write_text


def _hidden(parent):
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


def test_directory_appears_only_when_complete(tmp_path):
    target = tmp_path / "out"
    with atomic_directory(target) as tmp:
        (tmp / "a.txt").write_text("one")
        assert not target.exists()
    assert (target / "a.txt").read_text() == "one"
    assert _hidden(tmp_path) == []
    assert oct(target.stat().st_mode & 0o777) == oct(0o777 & ~_umask())


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_failure_leaves_the_old_version_and_no_temp(tmp_path):
    target = tmp_path / "out"
    with atomic_directory(target) as tmp:
        (tmp / "a.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_directory(target, overwrite=True) as tmp:
            (tmp / "a.txt").write_text("half")
            raise RuntimeError("killed mid-write")
    assert (target / "a.txt").read_text() == "old"
    assert _hidden(tmp_path) == []


def test_refuses_to_replace_without_overwrite(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(ForgelineError, match="--overwrite"):
        with atomic_directory(target):
            pass
    with atomic_directory(target, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("x")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]


def test_refuses_a_file_target(tmp_path):
    target = tmp_path / "out"
    target.write_text("a file")
    with pytest.raises(ForgelineError, match="not a directory"):
        with atomic_directory(target, overwrite=True):
            pass


def test_atomic_text(tmp_path):
    path = tmp_path / "sub" / "x.json"
    atomic_write_text(path, "{}")
    atomic_write_text(path, '{"a": 1}')
    assert path.read_text() == '{"a": 1}'
    assert _hidden(path.parent) == []
