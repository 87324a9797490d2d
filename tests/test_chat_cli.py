"""`forgeline chat` driven through a pseudo-terminal, and `forgeline generate` with prompts and JSONL."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time

import pytest
import torch

from forgeline.cli import main
from forgeline.model import ModelConfig, build_model
from forgeline.model.formats.model_dir import save_model_dir

from test_generate import make_tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=320, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=256,
                      init_std=0.2)
    path = tmp_path_factory.mktemp("chat") / "model"
    save_model_dir(build_model(cfg).eval(), make_tokenizer(), path)
    return path


class Terminal:
    """A child process on a pseudo-terminal: write lines, read until a marker appears."""

    def __init__(self, argv, env):
        self.master, slave = os.openpty()
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True)
        os.close(slave)
        self.buffer = ""

    def read_until(self, marker: str, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while marker not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out waiting for {marker!r}; got {self.buffer!r}")
            ready, _, _ = select.select([self.master], [], [], left)
            if ready:
                try:
                    data = os.read(self.master, 4096)
                except OSError:  # EIO: the child closed the terminal
                    data = b""
                if not data:
                    raise AssertionError(f"process ended waiting for {marker!r}; got {self.buffer!r}")
                self.buffer += data.decode("utf-8", errors="replace").replace("\r\n", "\n")
        at = self.buffer.index(marker) + len(marker)
        out, self.buffer = self.buffer[:at], self.buffer[at:]
        return out

    def send(self, line: str) -> None:
        os.write(self.master, (line + "\n").encode())

    def close(self) -> int:
        try:
            return self.proc.wait(timeout=30)
        finally:
            os.close(self.master)


def test_chat_through_a_pty(model_dir):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    term = Terminal([sys.executable, "-m", "forgeline", "chat", str(model_dir), "--max-new-tokens", "6",
                     "--temperature", "0.8", "--seed", "0"], env)
    try:
        banner = term.read_until("> ")
        assert "forgeline chat:" in banner and "/reset" in banner
        term.send("hello there")
        reply = term.read_until("\n> ")
        assert reply.startswith("hello there\n")  # the terminal echoes the line, then the streamed reply follows
        term.send("the quick fox")
        term.read_until("\n> ")
        term.send("/history")
        history = term.read_until("\n> ")
        assert "[user] hello there" in history and "[user] the quick fox" in history
        assert history.count("[assistant]") == 2 and "(4 messages)" in history
        term.send("/reset")
        assert "(conversation cleared)" in term.read_until("\n> ")
        term.send("/history")
        assert "(0 messages)" in term.read_until("\n> ")
        term.send("/exit")
        assert term.close() == 0
    finally:
        if term.proc.poll() is None:
            term.proc.kill()


def test_generate_cli_prompts_and_jsonl(model_dir, tmp_path, capsys):
    assert main(["generate", str(model_dir), "--prompt", "hello", "--max-new-tokens", "5"]) == 0
    streamed = capsys.readouterr().out
    assert streamed.endswith("\n") and len(streamed) > 1
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"id": 1, "prompt": "hello world"}) + "\n\n"
                       + json.dumps({"id": 2, "messages": [{"role": "user", "content": "hi"}]}) + "\n")
    out = tmp_path / "out.jsonl"
    assert main(["generate", str(model_dir), "--input", str(prompts), "--output", str(out), "--max-new-tokens", "4",
                 "--temperature", "0.7", "--top-p", "0.9", "--seed", "1"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [1, 2]
    assert all(isinstance(r["completion"], str) and r["finish_reason"] in ("stop", "length") for r in rows)
    # A malformed line is one clear error naming the file and line.
    prompts.write_text(json.dumps({"prompt": "ok"}) + "\n" + "{not json\n")
    capsys.readouterr()
    assert main(["generate", str(model_dir), "--input", str(prompts)]) == 2
    err = capsys.readouterr().err
    assert f"{prompts}:2:" in err and "Traceback" not in err
