"""`forgeline sft` end to end: from a pre-trained run to a chat model; epochs and sample batches; exact resume after
SIGKILL; DDP, FSDP2 and tensor-parallel runs against one process; bad input and refused layouts before any start."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from forgeline.cli import main

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def run_cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "forgeline", *map(str, args)], env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if "loss" in r}


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, story_dataset):
    """A tiny model pre-trained for a few steps on the story corpus: the model the SFT tests start from."""
    root = tmp_path_factory.mktemp("base")
    cfg = {
        "run_dir": str(root / "run"),
        "model": {"vocab_size": 512, "dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_dim": 128,
                  "max_seq_len": 256},
        "data": {"dataset": str(story_dataset), "seq_len": 64},
        "train": {"max_steps": 20, "micro_batch_size": 8, "lr": 3e-3, "warmup_steps": 2, "precision": "fp32"},
        "checkpoint": {"every": 20}, "stability": {"max_rollbacks": 0},
        "monitor": {"val_every": 100, "progress": False, "tensorboard": False, "peak_flops": 1e11},
    }
    (root / "base.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["pretrain", str(root / "base.yaml")]) == 0
    return root / "run"


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory) -> Path:
    """Arithmetic questions with their answers, as chat records (some with a system turn, some two-turn)."""
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("chat") / "arith.jsonl"
    with open(path, "w") as fh:
        for i in range(96):
            a, b = rng.randint(0, 20), rng.randint(0, 20)
            messages = [{"role": "user", "content": f"What is {a} plus {b}?"},
                        {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]
            if i % 5 == 0:
                messages.insert(0, {"role": "system", "content": "You add numbers."})
            if i % 7 == 0:
                messages += [{"role": "user", "content": "And doubled?"},
                             {"role": "assistant", "content": f"Doubled, {2 * (a + b)}."}]
            fh.write(json.dumps({"messages": messages}) + "\n")
    return path


def sft_config(path: Path, base_run: Path, data_file: Path, run_dir: Path, **sections) -> Path:
    cfg = {
        "run_dir": str(run_dir), "init": str(base_run),
        "data": {"train": [str(data_file)], "max_length": 96, "template": "chatml"},
        "train": {"epochs": 2, "global_batch_samples": 16, "micro_batch_size": 4, "lr": 1e-3, "precision": "fp32"},
        "checkpoint": {"every": 3, "keep_last": 2},
        "monitor": {"val_every": 4, "val_batches": 4, "progress": False, "tensorboard": False, "peak_flops": 1e11},
    }
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_sft_from_a_pretrained_run_to_a_chat_model(tmp_path, base_run, chat_data, capsys):
    run = tmp_path / "sft"
    cfg = sft_config(tmp_path / "sft.yaml", base_run, chat_data, run, data={"val_fraction": 0.1})
    assert main(["sft", str(cfg)]) == 0
    out = capsys.readouterr().out
    saved = yaml.safe_load((run / "config.yaml").read_text())
    # 86 training samples packed into rows of 64 tokens; 16 samples per step: the step count comes from the epochs
    assert "steps per epoch" in out and saved["train"]["max_steps"] >= 2
    assert saved["train"]["warmup_steps"] == 1 and saved["model"]["vocab_size"] == 512
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    assert len(train) == saved["train"]["max_steps"]
    assert all(r["step_tokens"] > r["loss_units"] > 0 for r in train)  # prompts are read, not learned
    assert train[-1]["loss"] < train[0]["loss"]
    assert [r for r in records if "val_loss" in r]

    model_dir = run / "model"
    tok_cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tok_cfg["chat_template"]
    from forgeline.model.formats import load_model

    loaded = load_model(model_dir)
    im_end = loaded.tokenizer.token_to_id("<|im_end|>")
    assert im_end in loaded.generation_config["eos_token_id"]  # a generated turn stops at its end-of-turn token
    assert (run / "tokenizer" / "tokenizer.json").is_file()  # the run's tokenizer, with the template it used
    # the Hugging Face export of the run carries both: transformers stops generating at the end of a turn
    assert main(["export", "hf", str(run), str(tmp_path / "hf")]) == 0
    gen = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    eos = gen["eos_token_id"] if isinstance(gen["eos_token_id"], list) else [gen["eos_token_id"]]
    assert im_end in eos
    assert "<|im_start|>" in json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())["chat_template"]


def test_resume_after_sigkill_reproduces_the_uninterrupted_losses(tmp_path, base_run, chat_data):
    straight = tmp_path / "straight"
    sections = dict(train={"epochs": 4, "global_batch_samples": 8}, checkpoint={"every": 4})
    result = run_cli("sft", sft_config(tmp_path / "a.yaml", base_run, chat_data, straight, **sections))
    assert result.returncode == 0, result.stderr
    expected = losses(straight)
    total = max(expected)
    assert sorted(expected) == list(range(1, total + 1)) and total >= 12

    killed = tmp_path / "killed"
    cfg = sft_config(tmp_path / "b.yaml", base_run, chat_data, killed, **sections)
    proc = subprocess.Popen([sys.executable, "-m", "forgeline", "sft", str(cfg)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial: list[str] = []
    deadline = time.time() + 300
    try:
        while time.time() < deadline:
            metrics = killed / "metrics.jsonl"
            if metrics.exists() and len(partial := metrics.read_text().splitlines()) >= total // 2 + 2:
                break
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    ckpt_steps = sorted(int(p.name.split("_")[1]) for p in (killed / "checkpoints").glob("step_*"))
    assert ckpt_steps and ckpt_steps[-1] < total, "the run finished before it could be killed"

    result = run_cli("sft", cfg, "--resume")
    assert result.returncode == 0, result.stderr
    assert f"resumed from step {ckpt_steps[-1]}" in result.stderr + result.stdout
    assert losses(killed) == expected  # bit for bit: weights, optimizer, schedule and the packed-row position


@pytest.mark.slow
@pytest.mark.parametrize("layout, micro, overrides", [
    ("ddp", 2, []),
    ("fsdp2", 2, ["parallel.dp_shard=-1"]),
    ("tp", 4, ["parallel.tp=2"]),
])
def test_two_processes_match_one_process(tmp_path, base_run, chat_data, layout, micro, overrides):
    # the same global batch of packed rows: 4 rows on one process, 2 + 2 on two data-parallel ranks, or the same 4
    # on both tensor-parallel ranks; for tp the max length is even (sequence parallelism splits the rows)
    sections = dict(train={"max_steps": 4, "epochs": None, "global_batch_samples": None}, checkpoint={"every": 100})
    single = tmp_path / "single"
    cfg = sft_config(tmp_path / "s.yaml", base_run, chat_data, single, **sections)
    assert run_cli("sft", cfg, "train.micro_batch_size=4").returncode == 0
    multi = tmp_path / layout
    cfg = sft_config(tmp_path / "m.yaml", base_run, chat_data, multi, **sections)
    result = run_cli("sft", cfg, f"train.micro_batch_size={micro}", *overrides, "--nproc", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = losses(single), losses(multi)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:  # fp32; reductions in another order: equal to rounding, not bitwise
        assert abs(a[step] - b[step]) < 2e-5, (layout, step, a[step], b[step])
    assert (multi / "model" / "model.safetensors").is_file()


def test_a_malformed_record_names_file_and_line(tmp_path, base_run, chat_data, capsys):
    bad = tmp_path / "bad.jsonl"
    lines = chat_data.read_text().splitlines()[:10]
    lines[6] = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}]})
    bad.write_text("\n".join(lines) + "\n")
    cfg = sft_config(tmp_path / "bad.yaml", base_run, bad, tmp_path / "run")
    assert main(["sft", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:7" in err and "role" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoints").exists()
    # skipped and counted instead, when the user says so
    assert main(["sft", str(cfg), "data.on_error=skip", "train.epochs=1", "train.global_batch_samples=4"]) == 0
    out = capsys.readouterr().out
    assert "10 records -> 9 samples" in out and "1 skipped" in out


@pytest.mark.parametrize("override, message", [
    ("parallel.pp=2", "pipeline parallelism"),
    ("parallel.backend=deepspeed", "deepspeed is not supported for sft"),
])
def test_unsupported_layouts_are_refused_before_any_process_starts(tmp_path, base_run, chat_data, capsys,
                                                                   override, message):
    cfg = sft_config(tmp_path / "x.yaml", base_run, chat_data, tmp_path / "run")
    started = time.time()
    assert main(["sft", str(cfg), override, "--nproc", "2"]) == 2
    assert message in capsys.readouterr().err
    assert time.time() - started < 10 and not (tmp_path / "run").exists()


def test_rows_are_no_longer_than_the_models_context(tmp_path, base_run, chat_data, capsys):
    """base_run's context is 256 tokens: the default data.max_length (4096) becomes 256; asking for more is an
    error naming the field, not rows the model cannot attend over (and their memory)."""
    cfg = sft_config(tmp_path / "x.yaml", base_run, chat_data, tmp_path / "run", train={"max_steps": 1})
    plain = yaml.safe_load(cfg.read_text())
    del plain["data"]["max_length"]
    cfg.write_text(yaml.safe_dump(plain))
    assert main(["sft", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "data.max_length: 256 (the model's context)" in out and "rows of up to 256 tokens" in out
    assert main(["sft", str(cfg), "data.max_length=512", f"run_dir={tmp_path / 'run2'}"]) == 2
    assert "data.max_length=512 is longer than the model's context (max_seq_len=256)" in capsys.readouterr().err


def test_sft_needs_a_model_and_existing_data(tmp_path, base_run, chat_data, capsys):
    cfg = sft_config(tmp_path / "x.yaml", base_run, chat_data, tmp_path / "run")
    assert main(["sft", str(cfg), f"init={tmp_path / 'nowhere'}"]) == 2
    assert "nowhere" in capsys.readouterr().err
    assert main(["sft", str(cfg), f"data.train=[{tmp_path / 'missing.jsonl'}]"]) == 2
    assert "missing.jsonl" in capsys.readouterr().err


@pytest.mark.parametrize("recipe", sorted((Path(__file__).parents[1] / "recipes").glob("sft-*.yaml")),
                         ids=lambda p: p.name)
def test_the_sft_recipe_files_are_valid_configs(recipe):
    from forgeline.config import SFTConfig, load_config

    cfg = load_config(SFTConfig, recipe)
    assert cfg.init is not None and cfg.data.train and cfg.train.precision == "bf16"


@pytest.mark.slow
def test_sigterm_to_the_launcher_stops_every_rank_with_a_checkpoint(tmp_path, base_run, chat_data):
    # a scheduler signals the command it started: `forgeline sft --nproc 2` passes it on to torchrun and its ranks
    run = tmp_path / "run"
    cfg = sft_config(tmp_path / "x.yaml", base_run, chat_data, run,
                     train={"max_steps": 5000, "epochs": None, "global_batch_samples": None, "micro_batch_size": 2},
                     checkpoint={"every": 10000})
    proc = subprocess.Popen([sys.executable, "-m", "forgeline", "sft", str(cfg), "--nproc", "2"], env=ENV,
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            metrics = run / "metrics.jsonl"
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert "preempted by SIGTERM" in err and "Traceback" not in err
    steps = sorted(int(p.name.split("_")[1]) for p in (run / "checkpoints").glob("step_*"))
    assert steps and 3 <= steps[-1] < 5000 and not (run / "model").exists()
