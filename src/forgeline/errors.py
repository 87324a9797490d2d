"""User-facing errors.

Every mistake a user can make (a bad config value, a missing file, a malformed JSONL line) is raised as a
``ForgelineError`` whose message names the file and line or the config field. The CLI prints that message alone
and exits non-zero; anything else that escapes is a bug in forgeline and keeps its traceback.
"""

from __future__ import annotations

from pathlib import Path


class ForgelineError(Exception):
    """An error caused by the user's input, reported without a traceback."""


class ConfigError(ForgelineError):
    """A configuration value is missing, unknown, of the wrong type or out of range."""


class DataError(ForgelineError):
    """A data file is missing, empty, malformed or incompatible."""

    def __init__(self, message: str, path: str | Path | None = None, line: int | None = None):
        where = ""
        if path is not None:
            where = f"{path}:{line}: " if line is not None else f"{path}: "
        super().__init__(where + message)
        self.path = None if path is None else str(path)
        self.line = line


class CheckpointError(ForgelineError):
    """A checkpoint is missing, incomplete or does not fit the model being trained."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint or model directory whose files do not match what was written: one missing, cut short, changed
    on disk, or the manifest itself missing or unreadable. `file` is the damaged file, `reason` what is wrong with
    it ("is missing (listed in the manifest)")."""

    def __init__(self, checkpoint: str | Path, file: str | Path, reason: str):
        super().__init__(f"{file} {reason}")
        self.checkpoint = Path(checkpoint)
        self.file = Path(file)
        self.reason = reason

    def short(self) -> str:
        """The damage relative to the checkpoint directory, for one-line reports about that directory."""
        try:
            name = self.file.relative_to(self.checkpoint).as_posix()
        except ValueError:
            name = str(self.file)
        return f"{name} {self.reason}"
