"""The preference stages on the one training loop: reward model, DPO (cached reference, the base with adapters off,
a frozen copy), SimPO, ORPO and KTO train from a small pre-trained model; the first DPO step's loss is log 2 (the
policy is the reference); the three ways to get the reference give the same losses; resume is exact; DDP matches
one process; the reward model is a whole model directory that `forgeline rm score` reads."""

import json
import math
import random
import shutil

import pytest
import yaml

from forgeline.cli import main
from test_sft import base_run, losses, run_cli  # noqa: F401  (fixtures)

MONITOR = {"val_every": 4, "val_batches": 8, "progress": False, "tensorboard": False, "peak_flops": 1e11}


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    """An answer (chosen) against one of a few evasions (rejected): a preference a tiny model learns in a few steps
    and that carries over to held-out prompts."""
    rng = random.Random(0)
    evasions = ["No idea, sorry.", "I will not say.", "Ask someone else."]
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    with open(path, "w") as fh:
        for _ in range(80):
            a, b = rng.randint(0, 20), rng.randint(0, 20)
            fh.write(json.dumps({"prompt": f"What is {a} plus {b}?", "chosen": f"{a} plus {b} is {a + b}.",
                                 "rejected": rng.choice(evasions)}) + "\n")
    return path


@pytest.fixture(scope="module")
def unpaired_file(tmp_path_factory):
    rng = random.Random(1)
    path = tmp_path_factory.mktemp("kto") / "kto.jsonl"
    with open(path, "w") as fh:
        for i in range(64):
            a, b = rng.randint(0, 20), rng.randint(0, 20)
            good = i % 2 == 0
            answer = a + b if good else a + b + rng.choice([-2, -1, 1, 2])
            fh.write(json.dumps({"prompt": f"What is {a} plus {b}?", "completion": f"{a} plus {b} is {answer}.",
                                 "label": good}) + "\n")
    return path


def config(path, base_run, data_file, run_dir, **sections):
    cfg = {
        "run_dir": str(run_dir), "init": str(base_run),
        "data": {"train": [str(data_file)], "max_length": 64, "template": "chatml", "val_fraction": 0.2},
        "train": {"max_steps": 8, "global_batch_samples": 8, "micro_batch_size": 4, "lr": 2e-3, "precision": "fp32",
                  "warmup_ratio": None, "warmup_steps": 1},
        "checkpoint": {"every": 4, "keep_last": 5},
        "stability": {"max_rollbacks": 0},
        "monitor": MONITOR,
    }
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    path.write_text(yaml.safe_dump(cfg))
    return path


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_rows(run_dir):
    return [r for r in metrics(run_dir) if "loss" in r]


def test_dpo_with_a_cached_reference_starts_at_log2_and_learns_the_preference(tmp_path, base_run, pairs_file,
                                                                             capsys):
    run = tmp_path / "dpo"
    cfg = config(tmp_path / "dpo.yaml", base_run, pairs_file, run, train={"max_steps": 12})
    assert main(["dpo", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "computed once with the starting policy" in out
    assert (run / "reference_logps.safetensors").is_file()
    rows = train_rows(run)
    # step 1: the policy is the reference, every implicit reward is 0 and the loss is log 2
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert rows[0]["reward_margin"] == pytest.approx(0.0, abs=1e-5)
    assert rows[-1]["loss"] < rows[0]["loss"] and rows[-1]["reward_margin"] > 0
    assert rows[-1]["reward_accuracy"] > 0.5
    evals = [r for r in metrics(run) if "val_reward_accuracy" in r]
    assert evals and evals[-1]["val_n_pairs"] == 16
    assert (run / "model" / "model.safetensors").is_file()


def test_the_three_references_give_the_same_losses(tmp_path, base_run, pairs_file):
    """Cached (computed by the starting policy), online from a frozen copy of init, and, for LoRA, the base with
    adapters off against a cache computed the same way."""
    got = {}
    for name, dpo in (("cached", {"reference": "cached"}), ("online", {"reference": "online"})):
        run = tmp_path / name
        cfg = config(tmp_path / f"{name}.yaml", base_run, pairs_file, run, dpo=dpo)
        assert main(["dpo", str(cfg)]) == 0
        got[name] = losses(run)
    assert got["cached"].keys() == got["online"].keys()
    for step, value in got["cached"].items():
        assert got["online"][step] == pytest.approx(value, abs=1e-5)
    lora = {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0}
    for name, dpo in (("lora_off", {"reference": "online"}), ("lora_cached", {"reference": "cached"})):
        run = tmp_path / name
        cfg = config(tmp_path / f"{name}.yaml", base_run, pairs_file, run, dpo=dpo, peft=lora)
        assert main(["dpo", str(cfg)]) == 0
        got[name] = losses(run)
        assert (run / "adapter" / "adapter_config.json").is_file()
    assert got["lora_off"][1] == pytest.approx(math.log(2), abs=1e-6)
    for step, value in got["lora_off"].items():
        assert got["lora_cached"][step] == pytest.approx(value, abs=1e-5)


def test_dpo_resume_reads_the_cached_reference_and_reproduces_the_losses(tmp_path, base_run, pairs_file, capsys):
    straight = tmp_path / "straight"
    cfg = config(tmp_path / "s.yaml", base_run, pairs_file, straight, train={"max_steps": 8})
    assert main(["dpo", str(cfg)]) == 0
    expected = losses(straight)
    stopped = tmp_path / "stopped"
    shutil.copytree(straight, stopped)
    shutil.rmtree(stopped / "model")
    shutil.rmtree(stopped / "checkpoints" / "step_00000008")
    kept = [line for line in (stopped / "metrics.jsonl").read_text().splitlines() if json.loads(line)["step"] <= 4]
    (stopped / "metrics.jsonl").write_text("\n".join(kept) + "\n")
    cfg2 = config(tmp_path / "r.yaml", base_run, pairs_file, stopped, train={"max_steps": 8})
    capsys.readouterr()
    assert main(["dpo", str(cfg2), "--resume"]) == 0
    assert "log-probs read from" in capsys.readouterr().out
    got = losses(stopped)
    for step in range(5, 9):
        assert got[step] == pytest.approx(expected[step], abs=1e-6)


@pytest.mark.parametrize("loss_type", ["ipo", "hinge", "simpo"])
def test_dpo_loss_types_train(tmp_path, base_run, pairs_file, loss_type):
    run = tmp_path / loss_type
    cfg = config(tmp_path / "c.yaml", base_run, pairs_file, run, dpo={"loss_type": loss_type, "beta": 0.5},
                 train={"max_steps": 4})
    assert main(["dpo", str(cfg)]) == 0
    rows = train_rows(run)
    assert len(rows) == 4 and all(math.isfinite(r["loss"]) for r in rows)
    # SimPO has no reference: nothing is computed or cached
    assert (run / "reference_logps.safetensors").is_file() == (loss_type != "simpo")


def test_orpo_and_kto_train(tmp_path, base_run, pairs_file, unpaired_file):
    run = tmp_path / "orpo"
    assert main(["orpo", str(config(tmp_path / "o.yaml", base_run, pairs_file, run))]) == 0
    rows = train_rows(run)
    assert rows[-1]["nll"] < rows[0]["nll"] and all(math.isfinite(r["loss"]) for r in rows)
    run = tmp_path / "kto"
    assert main(["kto", str(config(tmp_path / "k.yaml", base_run, unpaired_file, run))]) == 0
    rows = train_rows(run)
    assert rows[0]["loss"] == pytest.approx(0.5, abs=1e-5)  # policy = reference, KL 0: 1 - sigmoid(0) for all
    assert all(math.isfinite(r["loss"]) for r in rows) and (run / "model").is_dir()


def test_reward_model_trains_exports_and_scores(tmp_path, base_run, pairs_file, capsys):
    run = tmp_path / "rm"
    cfg = config(tmp_path / "rm.yaml", base_run, pairs_file, run, train={"max_steps": 12, "lr": 1e-3},
                 reward={"center_coef": 0.01})
    assert main(["rm", str(cfg)]) == 0
    rows = train_rows(run)
    assert {"accuracy", "margin", "reward_chosen", "reward_rejected"} <= rows[-1].keys()
    assert rows[-1]["loss"] < rows[0]["loss"]
    saved = json.loads((run / "model" / "forgeline_config.json").read_text())
    assert saved["head"] == "score" and saved["pad_token_id"] is not None
    capsys.readouterr()
    out_file = tmp_path / "scores.jsonl"
    assert main(["rm", "score", str(run / "model"), "--input", str(pairs_file), "--template", "chatml",
                 "--out", str(out_file)]) == 0
    summary = capsys.readouterr().out
    assert "80 pairs" in summary and "accuracy" in summary and "95% CI" in summary
    lines = out_file.read_text().splitlines()
    assert len(lines) == 80 and {"reward_chosen", "reward_rejected"} <= json.loads(lines[0]).keys()


def test_reward_model_rows_with_one_prompt_train_as_pair_rows_do(tmp_path, base_run, pairs_file):
    """reward.share_prompt (the default: chosen and rejected in one row over one copy of the prompt) and two rows
    per pair train to the same losses and metrics, from fewer tokens."""
    runs = {}
    for share in (True, False):
        run = runs[share] = tmp_path / f"rm_{share}"
        cfg = config(tmp_path / f"rm_{share}.yaml", base_run, pairs_file, run, train={"max_steps": 4},
                     reward={"share_prompt": share, "center_coef": 0.01})
        assert main(["rm", str(cfg)]) == 0
    shared, separate = train_rows(runs[True]), train_rows(runs[False])
    assert len(shared) == len(separate) == 4
    for step, (a, b) in enumerate(zip(shared, separate)):
        for key in ("loss", "accuracy", "margin", "reward_chosen", "reward_rejected"):
            # the same model before the first update; after it, fp32 sums taken in another order drift apart (Adam
            # scales the tiny differences of near-zero gradients up)
            assert a[key] == (pytest.approx(b[key], abs=1e-6) if step == 0 else pytest.approx(b[key], rel=1e-3)), (
                step, key)
    step_tokens = [[r["step_tokens"] for r in metrics(run) if "step_tokens" in r] for run in runs.values()]
    assert sum(step_tokens[0]) < sum(step_tokens[1])
    evals = [[r["val_loss"] for r in metrics(run) if "val_loss" in r] for run in runs.values()]
    assert evals[0] and evals[0] == pytest.approx(evals[1], rel=1e-3)


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_an_adapter_reward_model_is_written_merged(tmp_path, base_run, pairs_file, capsys, method):
    run = tmp_path / "rm_lora"
    cfg = config(tmp_path / "rl.yaml", base_run, pairs_file, run, peft={"method": method, "r": 4, "alpha": 8},
                 train={"max_steps": 4})
    assert main(["rm", str(cfg)]) == 0
    assert "merged" in capsys.readouterr().out
    saved = json.loads((run / "model" / "forgeline_config.json").read_text())
    assert saved["head"] == "score" and not (run / "adapter").exists()
    assert main(["rm", "score", str(run / "model"), "--input", str(pairs_file), "--template", "chatml"]) == 0


def test_bad_preference_input_is_one_clear_error(tmp_path, base_run, pairs_file, unpaired_file, capsys):
    cfg = config(tmp_path / "k.yaml", base_run, pairs_file, tmp_path / "k")
    assert main(["kto", str(cfg), "data.format=unpaired"]) == 2
    err = capsys.readouterr().err
    assert "pairs.jsonl:1" in err
    assert main(["dpo", str(cfg), "dpo.loss_type=foo"]) == 2
    assert "dpo.loss_type" in capsys.readouterr().err
    no_init = config(tmp_path / "n.yaml", base_run, pairs_file, tmp_path / "n", init=None)
    assert main(["rm", str(no_init)]) == 2
    assert "rm needs init" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("layout,peft", [("ddp", None), ("fsdp2", None), ("fsdp2", "lora")])
def test_dpo_on_two_ranks_matches_one_process(tmp_path, base_run, pairs_file, layout, peft):
    """DDP and FSDP2, with the cached reference (each rank computes its share, gathered) and, with LoRA, the base
    with adapters off under FSDP2's sharded forward."""
    sections = {"parallel": {"dp_shard": -1}} if layout == "fsdp2" else {}
    if peft:
        sections["peft"] = {"method": peft, "r": 4, "alpha": 8, "dropout": 0.0}
    one = tmp_path / "one"
    assert main(["dpo", str(config(tmp_path / "1.yaml", base_run, pairs_file, one, **sections))]) == 0
    two = tmp_path / "two"
    result = run_cli("dpo", config(tmp_path / "2.yaml", base_run, pairs_file, two, **sections), "--nproc", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = losses(one), losses(two)
    assert a.keys() == b.keys()
    for step in a:
        assert b[step] == pytest.approx(a[step], abs=1e-5)
    evals = [r for r in metrics(two) if "val_reward_accuracy" in r]
    assert evals and evals[-1]["val_n_pairs"] == 16


@pytest.mark.slow
def test_reward_model_on_two_fsdp2_ranks_matches_one_process(tmp_path, base_run, pairs_file):
    """The reward model's rows of one prompt and two responses, with the last block's output positions, under
    FSDP2's sharded forward and backward."""
    sections = {"parallel": {"dp_shard": -1}}
    one = tmp_path / "one"
    assert main(["rm", str(config(tmp_path / "1.yaml", base_run, pairs_file, one, **sections))]) == 0
    two = tmp_path / "two"
    result = run_cli("rm", config(tmp_path / "2.yaml", base_run, pairs_file, two, **sections), "--nproc", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = losses(one), losses(two)
    assert a.keys() == b.keys()
    for step in a:
        assert b[step] == pytest.approx(a[step], abs=1e-5)
