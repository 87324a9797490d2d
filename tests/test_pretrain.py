"""`forgeline pretrain` end to end: outputs, exact resume after SIGKILL, DDP on 2 processes, bad input, real data."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from forgeline.cli import main

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def write_config(path: Path, dataset: Path, run_dir: Path, **sections) -> Path:
    cfg = {
        "run_dir": str(run_dir),
        "model": {"vocab_size": 512, "dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_dim": 128,
                  "max_seq_len": 128},
        "data": {"dataset": str(dataset), "seq_len": 64},
        "train": {"max_steps": 12, "micro_batch_size": 4, "lr": 3e-3, "warmup_steps": 2, "precision": "fp32"},
        "checkpoint": {"every": 4, "keep_last": 2},
        "monitor": {"val_every": 6, "val_batches": 2, "peak_flops": 1e11, "progress": False},
    }
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    path.write_text(yaml.safe_dump(cfg))
    return path


def losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            out[record["step"]] = record["loss"]
    return out


def run_cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "forgeline", *map(str, args)], env=ENV, capture_output=True,
                          text=True, timeout=600, **kw)


def test_pretrain_writes_every_artifact(tmp_path, story_dataset, capsys):
    cfg = write_config(tmp_path / "run.yaml", story_dataset, tmp_path / "run")
    assert main(["pretrain", str(cfg), "train.max_steps=8", "--print-config"]) == 0
    run = tmp_path / "run"
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["max_steps"] == 8
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, 9))
    assert {"grad_norm", "lr", "tokens_per_s", "mfu", "mem_peak_gb"} <= set(train[0])
    val = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in val] == [6, 8] and val[-1]["val_bpb"] > 0
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["step_00000004", "step_00000008"]
    meta = json.loads((run / "checkpoints" / "step_00000008" / "meta.json").read_text())
    assert meta["forgeline_version"] and "git_commit" in meta
    state = json.loads((run / "checkpoints" / "step_00000008" / "trainer_state.json").read_text())
    assert state["data"]["batch_in_epoch"] == 8
    from forgeline.model.formats.model_dir import read_model_dir

    model = read_model_dir(run / "model").model
    assert model.cfg.vocab_size == 512
    assert (run / "model" / "tokenizer.json").is_file()
    out = capsys.readouterr().out
    assert "resolved config:" in out and "max_steps: 8" in out


def test_resume_after_sigkill_reproduces_the_uninterrupted_losses(tmp_path, story_dataset):
    overrides = {"train": {"max_steps": 20}, "checkpoint": {"every": 5}}
    straight = tmp_path / "straight"
    result = run_cli("pretrain", write_config(tmp_path / "a.yaml", story_dataset, straight, **overrides))
    assert result.returncode == 0, result.stderr
    expected = losses(straight)
    assert sorted(expected) == list(range(1, 21))

    killed = tmp_path / "killed"
    cfg = write_config(tmp_path / "b.yaml", story_dataset, killed, **overrides)
    proc = subprocess.Popen([sys.executable, "-m", "forgeline", "pretrain", str(cfg)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    try:
        while time.time() < deadline:
            metrics = killed / "metrics.jsonl"
            if metrics.exists() and len(losses_partial := metrics.read_text().splitlines()) >= 12:
                break
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert len(losses_partial) < 20 + 3, "the run finished before it could be killed"
    ckpt_steps = sorted(int(p.name.split("_")[1]) for p in (killed / "checkpoints").glob("step_*"))
    assert ckpt_steps and ckpt_steps[-1] < 20

    result = run_cli("pretrain", cfg, "--resume")
    assert result.returncode == 0, result.stderr
    assert f"resumed from step {ckpt_steps[-1]}" in result.stderr + result.stdout
    resumed = losses(killed)
    assert sorted(resumed) == list(range(1, 21))
    assert resumed == expected  # bit-for-bit: same weights, optimizer, schedule and data position


def test_ddp_on_two_processes_matches_one_process(tmp_path, story_dataset):
    # The same global batch (8 sequences) as 1 x 8 and as 2 ranks x 4.
    single = tmp_path / "single"
    result = run_cli("pretrain", write_config(tmp_path / "s.yaml", story_dataset, single,
                                              train={"micro_batch_size": 8, "max_steps": 6}))
    assert result.returncode == 0, result.stderr
    ddp = tmp_path / "ddp"
    cfg = write_config(tmp_path / "d.yaml", story_dataset, ddp, train={"micro_batch_size": 4, "max_steps": 6})
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
         "-m", "forgeline", "pretrain", str(cfg)],
        env=ENV, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = losses(single), losses(ddp)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    # fp32; gradients are summed in a different order (all-reduce), so equal to float rounding, not bitwise.
    for step in a:
        assert abs(a[step] - b[step]) < 1e-5, (step, a[step], b[step])


def test_gradient_accumulation_config_must_divide(tmp_path, story_dataset, capsys):
    cfg = write_config(tmp_path / "run.yaml", story_dataset, tmp_path / "run")
    assert main(["pretrain", str(cfg), "train.global_batch_tokens=1000"]) == 2
    err = capsys.readouterr().err
    assert "train.global_batch_tokens=1000 is not a multiple of micro_batch_size (4) x seq_len (64)" in err


def test_user_errors_exit_2_with_one_message_and_no_traceback(tmp_path, story_dataset):
    cfg = write_config(tmp_path / "run.yaml", story_dataset, tmp_path / "run")
    cases = [
        (["pretrain", cfg, "train.lrr=1"], "train.lrr: unknown key; did you mean 'lr'?"),
        (["pretrain", tmp_path / "missing.yaml"], "missing.yaml does not exist"),
        (["pretrain", cfg, "data.dataset=" + str(tmp_path)], "no index.json"),
        (["pretrain", cfg, "data.seq_len=4096"], "data.seq_len=4096 exceeds model.max_seq_len=128"),
    ]
    for args, message in cases:
        result = run_cli(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert message in result.stderr, (message, result.stderr)
        assert "Traceback" not in result.stderr
    # Shards made with another tokenizer are refused.
    from forgeline.tokenizer import train_bpe

    other = tmp_path / "other.txt"
    other.write_text("completely different words here " * 200)
    train_bpe([other], vocab_size=300, output_dir=tmp_path / "othertok", show_progress=False)
    result = run_cli("pretrain", cfg, f"tokenizer={tmp_path / 'othertok'}")
    assert result.returncode == 2 and "made with another tokenizer" in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
    # A run directory with checkpoints is not silently overwritten.
    assert main(["pretrain", str(cfg), "train.max_steps=4"]) == 0
    result = run_cli("pretrain", cfg, "train.max_steps=4")
    assert result.returncode == 2 and "pass --resume" in result.stderr


def test_pretraining_on_tiny_shakespeare_beats_the_unigram_baseline(tmp_path, shared_data):
    import numpy as np

    from forgeline.data import load_index

    text = shared_data / "tinyshakespeare" / "input.txt"
    assert main(["tokenizer", "train", f"inputs=[{text}]", f"output={tmp_path / 'tok'}", "vocab_size=1024"]) == 0
    assert main(["data", "prepare", f"inputs=[{text}]", f"tokenizer={tmp_path / 'tok'}", f"output={tmp_path / 'data'}",
                 "val_fraction=0.05"]) == 0
    index = load_index(tmp_path / "data")
    train_tokens = np.concatenate([np.fromfile(tmp_path / "data" / s["file"], dtype=index["dtype"])
                                   for s in index["splits"]["train"]["shards"]])
    counts = np.bincount(train_tokens, minlength=1024).astype(np.float64)
    p = counts / counts.sum()
    unigram_entropy = float(-(p[p > 0] * np.log(p[p > 0])).sum())  # nats/token of the best context-free model

    run = tmp_path / "run"
    assert main(["pretrain", "recipes/pretrain-tiny-shakespeare.yaml", f"run_dir={run}",
                 f"data.dataset={tmp_path / 'data'}", "data.seq_len=128", "train.max_steps=150",
                 "train.warmup_steps=15", "monitor.val_every=50", "monitor.sample_every=1000",
                 "monitor.progress=false", "checkpoint.every=1000"]) == 0
    val = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val_losses = [r["val_loss"] for r in val if "val_loss" in r]
    assert val_losses == sorted(val_losses, reverse=True), val_losses
    print(f"unigram entropy {unigram_entropy:.3f} nats/token; validation loss {val_losses} ")
    assert val_losses[-1] < unigram_entropy - 0.5
