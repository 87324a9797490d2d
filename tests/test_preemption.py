"""Preemption: SIGTERM / SIGUSR1 sent to a real `python -m forgeline pretrain` (once or twice) finish the step, write
a checkpoint and exit 0, and `--resume=auto` continues exactly; under torchrun a signal to one rank stops every rank
after the same step. The sharded (DCP) checkpoint such a run leaves is then damaged on purpose: resuming passes over
it to the newest intact one.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from forgeline.cli import main
from forgeline.model.formats.checkpoint import list_checkpoints, verify_checkpoint

sys.path.insert(0, str(Path(__file__).parent))
from test_parallel import assert_close_losses, free_port, write_base  # noqa: E402
from test_pretrain import ENV, losses, run_cli, write_config  # noqa: E402

PREEMPTED = re.compile(r"preempted by (SIG\w+) at step (\d+); checkpoint written to (\S+); continue with "
                       r"--resume=auto")


def wait_for_steps(proc: subprocess.Popen, run: Path, n: int, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    metrics = run / "metrics.jsonl"
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before it could be signalled:\n"
                                 + proc.stderr.read()[-3000:])
        if metrics.exists() and len(metrics.read_text().splitlines()) >= n:
            return
        time.sleep(0.02)
    raise AssertionError(f"no {n} steps within {timeout} s")


def test_sigterm_finishes_the_step_writes_a_checkpoint_and_resume_auto_continues_exactly(tmp_path, story_dataset):
    overrides = dict(train={"max_steps": 400, "decay_steps": 400}, checkpoint={"every": 1000},
                     monitor={"val_every": 1000, "tensorboard": False})
    run = tmp_path / "run"
    cfg = write_config(tmp_path / "run.yaml", story_dataset, run, **overrides)
    proc = subprocess.Popen([sys.executable, "-m", "forgeline", "pretrain", str(cfg)], env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for_steps(proc, run, 5)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)  # delivered twice, as under Slurm + torchrun: still one clean stop
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    match = PREEMPTED.search(err)
    assert match, err[-3000:]
    step = int(match[2])
    assert match[1] == "SIGTERM" and 5 <= step < 400
    ckpt = run / "checkpoints" / f"step_{step:08d}"
    assert Path(match[3]) == ckpt and "Traceback" not in err
    verify_checkpoint(ckpt)
    assert sorted(losses(run)) == list(range(1, step + 1))  # the step in flight was finished, none after it
    assert not (run / "model").exists()  # the run is not over: no final model

    end = f"train.max_steps={step + 3}"
    result = run_cli("pretrain", cfg, "--resume=auto", end)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from step {step}" in result.stderr and "resume: train." not in result.stderr
    straight = tmp_path / "straight"
    result = run_cli("pretrain", write_config(tmp_path / "straight.yaml", story_dataset, straight, **overrides), end)
    assert result.returncode == 0, result.stderr[-3000:]
    assert losses(run) == losses(straight)  # bit for bit


def _worker_pid(master_port: int, rank: int) -> int:
    """The torchrun worker of this launch (by its MASTER_PORT) with this RANK."""
    wanted = {f"MASTER_PORT={master_port}".encode(), f"RANK={rank}".encode()}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            env = set((proc / "environ").read_bytes().split(b"\0"))
        except OSError:
            continue
        if wanted <= env:
            return int(proc.name)
    raise AssertionError(f"no worker with RANK={rank} on port {master_port}")


@pytest.mark.slow
def test_a_signal_to_one_torchrun_rank_stops_all_and_a_damaged_sharded_checkpoint_falls_back(tmp_path,
                                                                                             story_dataset, capsys):
    base = write_base(tmp_path / "base.yaml", story_dataset)
    common = ["train.max_steps=300", "train.decay_steps=300", "checkpoint.every=3", "monitor.val_every=1000"]
    run = tmp_path / "fsdp"
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port), "-m",
         "forgeline", "pretrain", str(base), f"run_dir={run}", "parallel.dp_shard=-1", "train.micro_batch_size=4",
         *common], env=ENV, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for_steps(proc, run, 4)
        os.kill(_worker_pid(port, 1), signal.SIGUSR1)  # rank 1 only: rank 0 learns it from the per-step all-reduce
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, (out + err)[-4000:]
    match = PREEMPTED.search(out + err)
    assert match and match[1] == "SIGUSR1", (out + err)[-4000:]
    step = int(match[2])
    ckpt = run / "checkpoints" / f"step_{step:08d}"
    assert Path(match[3]) == ckpt and (ckpt / "dcp" / ".metadata").is_file()
    assert sorted(p.name for p in (ckpt / "rng").glob("*.safetensors")) == ["rank_00000.safetensors",
                                                                            "rank_00001.safetensors"]
    verify_checkpoint(ckpt)
    assert sorted(losses(run)) == list(range(1, step + 1))

    # Damage the newest checkpoint; one process resumes the sharded run from the intact one before it.
    shard = ckpt / "dcp" / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[:100])
    previous = list_checkpoints(run / "checkpoints")[-2]
    end = f"train.max_steps={step + 2}"
    capsys.readouterr()
    assert main(["pretrain", str(base), f"run_dir={run}", *common, end, "--resume"]) == 0
    err = capsys.readouterr().err
    assert f"checkpoint {ckpt.name} is damaged (dcp/__1_0.distcp has 100 bytes; the manifest says" in err, err
    assert f"renamed it {ckpt.name}.corrupt" in err and f"resumed from step {int(previous.name[5:])}" in err
    assert (run / "checkpoints" / f"{ckpt.name}.corrupt" / "dcp").is_dir()
    reference = tmp_path / "single"
    assert main(["pretrain", str(base), f"run_dir={reference}", *common, end]) == 0
    got, want = losses(run), losses(reference)
    assert sorted(got) == list(range(1, step + 3))
    assert_close_losses(got, want, f"FSDP2 preempted at {step}, resumed from {previous.name} on one process")

