"""`forgeline grpo` and `forgeline rloo` end to end on a tiny model: the reward rises, a resumed run continues
exactly, a healthy run has no rollback, adapters give the KL reference for free, and bad input is one clear
error."""

from __future__ import annotations

import json

import pytest
import yaml

from forgeline.cli import main

from test_sft import base_run  # noqa: F401  (fixture)

MONITOR = {"progress": False, "tensorboard": False, "peak_flops": 1e11, "val_every": 1000}


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    starts = ["Once upon a time", "The little dog", "One day, a girl", "Tom and his mom", "The sun was", "A big cat",
              "Lily wanted to", "The bird sang"]
    path.write_text("".join(json.dumps({"prompt": s, "id": i}) + "\n" for i, s in enumerate(starts)))
    return path


@pytest.fixture(scope="module")
def reward_module(tmp_path_factory):
    """A reward the tiny story model can learn in a few dozen steps: the share of the letter 'e' in what it
    writes."""
    path = tmp_path_factory.mktemp("reward") / "my_rewards.py"
    path.write_text(
        "def e_share(prompts, completions, records):\n"
        "    return [c.count('e') / max(len(c), 1) for c in completions]\n"
        "\n"
        "calls = {'n': 0}\n"
        "def flaky(prompts, completions, records):\n"
        "    calls['n'] += 1\n"
        "    if calls['n'] == 2:\n"
        "        raise ValueError('the judge is down')\n"
        "    return [0.0 for c in completions]\n")
    return path


def config(path, base_run, prompts_file, run_dir, reward, **sections):
    cfg = {
        "run_dir": str(run_dir), "init": str(base_run),
        "data": {"train": [str(prompts_file)]},
        "rewards": [f"{reward}"],
        "rollout": {"prompts_per_step": 4, "samples_per_prompt": 4, "max_new_tokens": 12, "temperature": 1.0},
        "train": {"max_steps": 6, "micro_batch_size": 8, "lr": 3e-3, "precision": "fp32"},
        "checkpoint": {"every": 3, "keep_last": 5},
        "monitor": MONITOR,
    }
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    path.write_text(yaml.safe_dump(cfg))
    return path


def rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_grpo_raises_the_reward_without_a_rollback(tmp_path, base_run, prompts_file, reward_module):
    run = tmp_path / "grpo"
    cfg = config(tmp_path / "grpo.yaml", base_run, prompts_file, run, f"{reward_module}:e_share",
                 train={"max_steps": 30}, checkpoint={"every": 30},
                 stability={"warmup_steps": 5})  # the spike test is armed from step 5 on
    assert main(["grpo", str(cfg)]) == 0
    steps = [r for r in rows(run) if "reward" in r]
    assert len(steps) == 30 and {"kl", "clip_fraction", "completion_length", "grad_norm"} - {"kl"} <= steps[0].keys()
    first = sum(r["reward"] for r in steps[:6]) / 6
    last = sum(r["reward"] for r in steps[-6:]) / 6
    assert last > first + 0.05, (first, last)
    events = (run / "events.jsonl").read_text() if (run / "events.jsonl").exists() else ""
    assert "rollback" not in events
    assert (run / "model" / "model.safetensors").exists()


def test_a_resumed_run_continues_exactly(tmp_path, base_run, prompts_file, reward_module):
    whole = tmp_path / "whole"
    assert main(["grpo", str(config(tmp_path / "a.yaml", base_run, prompts_file, whole,
                                    f"{reward_module}:e_share", rollout={"epochs": 2}))]) == 0
    cut = tmp_path / "cut"
    assert main(["grpo", str(config(tmp_path / "b.yaml", base_run, prompts_file, cut, f"{reward_module}:e_share",
                                    rollout={"epochs": 2}, train={"max_steps": 3}))]) == 0
    # the same run to step 6 from the step-3 checkpoint: the step-3 rollouts are optimised once more, then new ones
    assert main(["grpo", str(config(tmp_path / "c.yaml", base_run, prompts_file, cut, f"{reward_module}:e_share",
                                    rollout={"epochs": 2})), "--resume"]) == 0
    a = {r["step"]: r["loss"] for r in rows(whole) if "loss" in r}
    b = {r["step"]: r["loss"] for r in rows(cut) if "loss" in r}
    for step in (4, 5, 6):
        assert b[step] == pytest.approx(a[step], abs=1e-6)


def test_rloo_and_lora_grpo_with_a_kl_reference_train(tmp_path, base_run, prompts_file, reward_module, capsys):
    run = tmp_path / "rloo"
    assert main(["rloo", str(config(tmp_path / "r.yaml", base_run, prompts_file, run, f"{reward_module}:e_share",
                                    rloo={"beta": 0.05}))]) == 0
    assert "reference:" in capsys.readouterr().out
    assert all(r["loss_units"] == 16 for r in rows(run) if "loss" in r)  # RLOO averages over completions
    lora = tmp_path / "lora"
    assert main(["grpo", str(config(tmp_path / "l.yaml", base_run, prompts_file, lora, f"{reward_module}:e_share",
                                    grpo={"beta": 0.1}, peft={"method": "lora", "r": 4, "alpha": 8},
                                    train={"lr": 1e-2}))]) == 0
    out = capsys.readouterr().out
    assert "adapters switched off" in out
    kls = [r["kl"] for r in rows(lora) if "kl" in r]
    assert kls[0] == pytest.approx(0.0, abs=1e-6) and kls[-1] > 0  # the adapters start at zero, then move away
    assert (lora / "adapter" / "adapter_config.json").exists()


def test_a_failing_reward_skips_one_batch_and_the_run_goes_on(tmp_path, base_run, prompts_file, reward_module,
                                                              capsys):
    run = tmp_path / "flaky"
    assert main(["grpo", str(config(tmp_path / "f.yaml", base_run, prompts_file, run, f"{reward_module}:flaky",
                                    train={"max_steps": 3}))]) == 0
    out = capsys.readouterr().out
    assert "skipped: reward" in out and "raised ValueError: the judge is down" in out
    assert sum(r.get("skipped_batches", 0) for r in rows(run)) == 1


def test_bad_rl_input_is_one_clear_error(tmp_path, base_run, prompts_file, reward_module, capsys):
    bad = config(tmp_path / "x.yaml", base_run, prompts_file, tmp_path / "x", "no_such_reward")
    assert main(["grpo", str(bad)]) != 0
    assert "no_such_reward" in capsys.readouterr().err
    bad = config(tmp_path / "y.yaml", base_run, prompts_file, tmp_path / "y", f"{reward_module}:e_share",
                 data={"prompt_format": "Question: {question}"})
    assert main(["grpo", str(bad)]) != 0
    err = capsys.readouterr().err
    assert "prompts.jsonl:1" in err and "'question'" in err
    bad = config(tmp_path / "z.yaml", base_run, prompts_file, tmp_path / "z", f"{reward_module}:e_share",
                 rollout={"samples_per_prompt": 1})
    assert main(["grpo", str(bad)]) != 0
    assert "rollout.samples_per_prompt" in capsys.readouterr().err


@pytest.mark.slow
def test_grpo_on_two_ranks_ddp_and_fsdp2_give_the_same_run(tmp_path, base_run, prompts_file, reward_module):
    """Each rank rolls out its share (2 of the 4 prompts a step); under FSDP2 from a whole copy of the current
    weights, so the samples and losses equal DDP's (the KL reference a frozen copy, sharded like the policy)."""
    from test_sft import run_cli

    runs = {}
    for layout, parallel in (("ddp", {}), ("fsdp2", {"dp_shard": -1})):
        run = tmp_path / layout
        result = run_cli("grpo", config(tmp_path / f"{layout}.yaml", base_run, prompts_file, run,
                                        f"{reward_module}:e_share", train={"max_steps": 3, "micro_batch_size": 4},
                                        grpo={"beta": 0.1}, parallel=parallel), "--nproc", "2")
        assert result.returncode == 0, result.stderr[-2000:]
        runs[layout] = [r for r in rows(run) if "loss" in r]
        assert len(runs[layout]) == 3 and all(0 <= r["reward"] <= 1 for r in runs[layout])
        assert (run / "model" / "model.safetensors").exists()
    for a, b in zip(runs["ddp"], runs["fsdp2"]):
        assert b["reward"] == pytest.approx(a["reward"], abs=1e-6)
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5) and b["kl"] == pytest.approx(a["kl"], abs=1e-6)
    bad = run_cli("grpo", config(tmp_path / "tp.yaml", base_run, prompts_file, tmp_path / "tp",
                                 f"{reward_module}:e_share", parallel={"tp": 2}), "--nproc", "2")
    assert bad.returncode != 0 and "whole model on every rank" in bad.stderr and "Traceback" not in bad.stderr
