"""Benchmarks during training (a stage config's `eval:` section): the trainer runs periodic evaluations on their own
cadence and at the last step; pretrain, sft and dpo log eval/TASK/METRIC at those steps, equal to `evaluate` of the
saved model; benchmarks leave training unchanged; every mistake in the section stops the stage before its first
step with one error naming the field."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from forgeline.cli import main
from forgeline.config import CheckpointConfig, StabilityConfig, TrainConfig
from forgeline.objectives import causal_lm_loss
from forgeline.train.distributed import DistInfo
from forgeline.train.trainer import PeriodicEval, Trainer
from test_train import QUIET, ListLoader, small_model

MODEL = {"vocab_size": 512, "dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_dim": 128,
         "max_seq_len": 128}
MONITOR = {"val_every": 3, "val_batches": 2, "peak_flops": 1e11, "progress": False, "tensorboard": False}

# (question, choices, answer): story words, so that the tiny models' tokenizer splits them into few tokens
QUESTIONS = [
    ("Where did the cat sleep?", ["on the bed", "in the sky", "under the sea", "on a cloud"], "A"),
    ("What did Tom eat?", ["a rock", "an apple", "the moon", "a shoe"], "B"),
    ("Who went to the park?", ["the sun", "a cup", "Lily and her dog", "the door"], "C"),
    ("What color was the ball?", ["loud", "happy", "fast", "red"], "D"),
    ("Why was the bird sad?", ["it lost its nest", "it was blue", "it could sing", "it liked trees"], "A"),
    ("What did mom bake?", ["a car", "a big cake", "a river", "a hat"], "B"),
]


@pytest.fixture(scope="module")
def bench_files(tmp_path_factory):
    """An ARC-format JSONL file and a TruthfulQA mc_task.json, whose MC2 score is a probability (not a count of
    right answers), so that a comparison of scores compares the model's log-likelihoods."""
    root = tmp_path_factory.mktemp("bench")
    arc = root / "arc.jsonl"
    with open(arc, "w") as fh:
        for i, (stem, texts, key) in enumerate(QUESTIONS):
            choices = [{"label": label, "text": text} for label, text in zip("ABCD", texts)]
            fh.write(json.dumps({"id": f"q{i}", "question": {"stem": stem, "choices": choices}, "answerKey": key})
                     + "\n")
    mc = root / "mc_task.json"
    items = []
    for stem, texts, key in QUESTIONS[:3]:
        gold = "ABCD".index(key)
        targets = {text: int(j == gold) for j, text in enumerate(texts)}
        items.append({"question": stem, "mc1_targets": targets, "mc2_targets": targets})
    mc.write_text(json.dumps(items))
    return {"arc_easy": arc, "truthfulqa_mc2": mc}


def write_config(path: Path, run_dir: Path, **sections) -> Path:
    cfg = {"run_dir": str(run_dir), "model": MODEL,
           "train": {"max_steps": 5, "micro_batch_size": 4, "lr": 3e-3, "warmup_steps": 1, "precision": "fp32"},
           "checkpoint": {"every": 100}, "stability": {"max_rollbacks": 0}, "monitor": MONITOR}
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    path.write_text(yaml.safe_dump(cfg))
    return path


def benchmark_section(files, **extra):
    return {"tasks": list(files), "every": 2, "limit": 4, "data": {k: str(v) for k, v in files.items()}, **extra}


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records(run_dir) if "loss" in r}


def benchmark_rows(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in records(run_dir) if any(k.startswith("eval/") for k in r)}


def evaluate_model_dir(model_dir: Path, files, limit=4) -> dict[str, float]:
    """forgeline eval's numbers for a saved model, the way the command computes them."""
    from forgeline.eval.engine import RequestEngine
    from forgeline.eval.run import evaluate
    from forgeline.model.formats import load_model

    loaded = load_model(model_dir, dtype=torch.float32)
    engine = RequestEngine(loaded.model, loaded.tokenizer)
    results = evaluate(engine, list(files), data={k: str(v) for k, v in files.items()}, limit=limit, report=None)
    out = {}
    for result in results:
        for metric, summary in result.metrics.items():
            out[f"eval/{result.task}/{metric}"] = summary["mean"]
            out[f"eval/{result.task}/{metric}_stderr"] = summary["stderr"]
    return out


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory, story_dataset, bench_files):
    """Pre-training for 5 steps with benchmarks every 2 steps (and the held-out loss every 3)."""
    root = tmp_path_factory.mktemp("pretrain")
    cfg = write_config(root / "run.yaml", root / "run", data={"dataset": str(story_dataset), "seq_len": 64},
                       eval=benchmark_section(bench_files))
    assert main(["pretrain", str(cfg)]) == 0
    return root / "run"


def test_pretrain_logs_benchmarks_at_their_steps_equal_to_evaluating_the_saved_model(bench_run, bench_files):
    rows = benchmark_rows(bench_run)
    assert sorted(rows) == [2, 4, 5]  # every 2 steps, and the last
    keys = {"eval/arc_easy/acc", "eval/arc_easy/acc_norm", "eval/truthfulqa_mc2/acc"}
    for step, row in rows.items():
        assert keys | {f"{k}_stderr" for k in keys} | {"eval/seconds"} <= set(row)
        assert all(0.0 <= row[k] <= 1.0 for k in keys), row
    # the benchmarks' records are their own: the held-out loss keeps its cadence
    assert [r["step"] for r in records(bench_run) if "val_loss" in r] == [3, 5]
    # the scores at the last step are those of the weights saved then
    expected = evaluate_model_dir(bench_run / "model", bench_files)
    assert set(expected) <= set(rows[5])
    for key, value in expected.items():
        assert abs(rows[5][key] - value) < 1e-6, (key, rows[5][key], value)
    # the mc2 score is a probability, so it moves with every step's weights
    assert rows[2]["eval/truthfulqa_mc2/acc"] != rows[5]["eval/truthfulqa_mc2/acc"]


@pytest.mark.slow
@pytest.mark.parametrize("layout, overrides", [
    ("ddp", ["train.micro_batch_size=2"]),
    ("fsdp2", ["train.micro_batch_size=2", "parallel.dp_shard=-1"]),
    ("tp", ["parallel.tp=2", "parallel.sequence_parallel=false"]),
    ("deepspeed", ["train.micro_batch_size=2", "parallel.backend=deepspeed", "parallel.dp_shard=-1"]),
])
def test_two_processes_log_the_scores_of_one(tmp_path, story_dataset, bench_files, bench_run, layout, overrides):
    # DDP deals the requests out over the ranks; the sharded layouts run every forward on every rank
    cfg = write_config(tmp_path / "run.yaml", tmp_path / "run", data={"dataset": str(story_dataset), "seq_len": 64},
                       eval=benchmark_section(bench_files))
    result = subprocess.run([sys.executable, "-m", "forgeline", "pretrain", str(cfg), *overrides, "--nproc", "2"],
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    single, multi = benchmark_rows(bench_run), benchmark_rows(tmp_path / "run")
    assert sorted(multi) == sorted(single) == [2, 4, 5]
    for step, row in single.items():  # the same training to rounding, so the same scores to rounding
        for key, value in row.items():
            if key.startswith("eval/") and key != "eval/seconds":
                assert abs(multi[step][key] - value) < 1e-5, (layout, step, key, multi[step][key], value)


def test_benchmarks_leave_training_unchanged(tmp_path, story_dataset, bench_run):
    cfg = write_config(tmp_path / "run.yaml", tmp_path / "run", data={"dataset": str(story_dataset), "seq_len": 64})
    assert main(["pretrain", str(cfg)]) == 0
    assert losses(tmp_path / "run") == losses(bench_run)
    assert not benchmark_rows(tmp_path / "run")


def documented_eval_section() -> dict:
    text = (Path(__file__).parents[1] / "docs" / "eval.md").read_text()
    section = text.split("## Evaluation during training", 1)[1]
    block = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    return yaml.safe_load(block)["eval"]


def test_the_documented_eval_section_trains(tmp_path, story_dataset, shared_data):
    from forgeline.config import SFTConfig, load_config
    from forgeline.parallel.layout import resolve_layout
    from forgeline.recipes.benchmarks import check_benchmark_config

    # the command-line spelling docs/eval.md and the README give, on the recipe they name
    recipe = Path(__file__).parents[1] / "recipes" / "sft-smollm2-alpaca.yaml"
    cfg = load_config(SFTConfig, recipe, ["eval.tasks=[arc_easy,hellaswag]", "eval.every=200", "eval.limit=100"])
    check_benchmark_config(cfg, resolve_layout(cfg.parallel, 1))
    assert cfg.eval.tasks == ["arc_easy", "hellaswag"] and cfg.eval.limit == 100
    # the YAML section: its tasks read their default copies in ../shared/data; two steps, so only the last one
    # is evaluated
    section = documented_eval_section()
    cfg = write_config(tmp_path / "run.yaml", tmp_path / "run", data={"dataset": str(story_dataset), "seq_len": 64},
                       train={"max_steps": 2}, eval=section)
    assert main(["pretrain", str(cfg)]) == 0
    rows = benchmark_rows(tmp_path / "run")
    assert sorted(rows) == [2]
    assert {f"eval/{task}/acc" for task in section["tasks"]} <= set(rows[2])


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    with open(path, "w") as fh:
        for _ in range(24):
            a, b = rng.randint(0, 9), rng.randint(0, 9)
            fh.write(json.dumps({"prompt": f"What is {a} plus {b}?", "chosen": f"It is {a + b}.",
                                 "rejected": "I do not know."}) + "\n")
    return path


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_fine_tuning_stages_log_benchmarks(tmp_path, bench_run, bench_files, pairs_file, stage):
    # sft reads the prompt/chosen pairs as instruction records: the prompt is the instruction, chosen the output
    data = ({"train": [str(pairs_file)], "max_length": 128, "template": "chatml", "format": "instruction",
             "instruction_style": "plain", "fields": {"instruction": "prompt", "output": "chosen"}} if stage == "sft"
            else {"train": [str(pairs_file)], "max_length": 64, "template": "chatml"})
    train = {"max_steps": 3, "epochs": None, "global_batch_samples": 4, "micro_batch_size": 4, "lr": 1e-3,
             "precision": "fp32", "warmup_ratio": None, "warmup_steps": 1}
    cfg = {"run_dir": str(tmp_path / "run"), "init": str(bench_run), "data": data, "train": train,
           "checkpoint": {"every": 100}, "monitor": MONITOR,
           "eval": benchmark_section({"arc_easy": bench_files["arc_easy"]}, every=2)}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    assert main([stage, str(tmp_path / "run.yaml")]) == 0
    rows = benchmark_rows(tmp_path / "run")
    assert sorted(rows) == [2, 3]
    expected = evaluate_model_dir(tmp_path / "run" / "model", {"arc_easy": bench_files["arc_easy"]})
    for key, value in expected.items():
        assert abs(rows[3][key] - value) < 1e-6, (key, rows[3][key], value)


def trainer(model, batch, run_dir, periodic):
    return Trainer(model=model, loss_fn=causal_lm_loss, train_loader=ListLoader([batch]),
                   train=TrainConfig(max_steps=7, warmup_steps=0, lr=1e-2, precision="fp32"),
                   checkpoint=CheckpointConfig(every=1000), stability=StabilityConfig(max_rollbacks=0), monitor=QUIET,
                   run_dir=run_dir, config_yaml="", dist=DistInfo(), periodic_evals=periodic)


def test_the_trainer_runs_each_periodic_evaluation_on_its_own_cadence_and_at_the_last_step(tmp_path):
    model = small_model()
    batch = {"input_ids": torch.randint(0, 64, (2, 16)), "targets": torch.randint(0, 64, (2, 16)),
             "n_targets": 32}
    calls = {"a": [], "b": []}

    def recorder(name):
        def fn(m):
            calls[name].append(m.training)
            return {f"{name}/score": float(len(calls[name]))}
        return fn

    periodic = [PeriodicEval("a", 3, recorder("a"), describe=lambda m: f"{m['a/score']:.0f}"),
                PeriodicEval("b", 2, recorder("b"))]
    result = trainer(model, batch, tmp_path, periodic).fit()
    logged = {name: [r["step"] for r in result.history if f"{name}/score" in r] for name in calls}
    assert logged == {"a": [3, 6, 7], "b": [2, 4, 6, 7]}
    assert result.final_periodic == {"a": (7, {"a/score": 3.0}), "b": (7, {"b/score": 4.0})}
    assert all(calls["a"] + calls["b"])  # called on the model in train mode, as the loop leaves it
    with pytest.raises(ValueError, match="every 0 steps"):
        PeriodicEval("c", 0, recorder("a"))
    with pytest.raises(ValueError, match="distinct names"):
        trainer(model, batch, tmp_path, [periodic[0], periodic[0]])


# -- mistakes: one error naming the field, before any step ------------------------------------------------------


@pytest.fixture
def pretrain_cfg(tmp_path, story_dataset, bench_files):
    return write_config(tmp_path / "run.yaml", tmp_path / "run", data={"dataset": str(story_dataset), "seq_len": 64},
                        eval=benchmark_section({"arc_easy": bench_files["arc_easy"]}))


def refused(capsys, tmp_path, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert not (tmp_path / "run").exists()  # refused before the run started: no model placed, no step
    return err


def test_an_unknown_task_is_refused_with_the_known_ones(capsys, tmp_path, pretrain_cfg):
    err = refused(capsys, tmp_path, ["pretrain", str(pretrain_cfg), "eval.tasks=[arc_easy,arc_eazy]"])
    assert "eval.tasks: unknown task 'arc_eazy'" in err and "arc_challenge, arc_easy" in err


def test_a_missing_benchmark_file_is_refused_at_start_up(capsys, tmp_path, pretrain_cfg, story_dataset,
                                                         monkeypatch):
    missing = tmp_path / "nowhere" / "arc.jsonl"
    err = refused(capsys, tmp_path, ["pretrain", str(pretrain_cfg), f"eval.data.arc_easy={missing}"])
    assert f"eval.data.arc_easy: {missing} does not exist" in err
    # without eval.data, the task's default copy in the shared data folder, which is not there either
    monkeypatch.setenv("FORGELINE_SHARED_DATA", str(tmp_path / "empty"))
    cfg = write_config(tmp_path / "default.yaml", tmp_path / "run", data={"dataset": str(story_dataset),
                                                                           "seq_len": 64},
                       eval={"tasks": ["hellaswag"], "every": 2})
    err = refused(capsys, tmp_path, ["pretrain", str(cfg)])
    assert "eval.data.hellaswag is not set" in err and str(tmp_path / "empty" / "hellaswag") in err
    # before torchrun starts any process, too
    err = refused(capsys, tmp_path, ["pretrain", str(pretrain_cfg), f"eval.data.arc_easy={missing}",
                                     "--nproc", "2"])
    assert "eval.data.arc_easy" in err


def test_a_malformed_benchmark_file_is_refused_before_training(capsys, tmp_path, pretrain_cfg, bench_files):
    bad = tmp_path / "bad.jsonl"
    lines = bench_files["arc_easy"].read_text().splitlines()
    lines[2] = json.dumps({"id": "x", "question": {"stem": "?", "choices": []}, "answerKey": "A"})
    bad.write_text("\n".join(lines) + "\n")
    err = refused(capsys, tmp_path, ["pretrain", str(pretrain_cfg), f"eval.data.arc_easy={bad}"])
    assert f"{bad}:3" in err


@pytest.mark.parametrize("overrides, message", [
    (["eval.sample=3"], "eval: set eval.limit or eval.sample, not both"),
    (["eval.data.arc-easy=x.jsonl"], "eval.data has arc-easy, which eval.tasks does not list"),
    (["eval.every=0"], "eval.every: Input should be greater than 0"),
    (["eval.tasks=[arc_easy,arc_easy]"], "eval.tasks lists arc_easy more than once"),
    (["parallel.pp=2", "--nproc", "2"], "eval.tasks: benchmarks score with the LM head on every rank"),
    (["parallel.tp=2", "--nproc", "2"], "set parallel.sequence_parallel=false"),
])
def test_invalid_eval_sections_are_refused(capsys, tmp_path, pretrain_cfg, overrides, message):
    assert message in refused(capsys, tmp_path, ["pretrain", str(pretrain_cfg), *overrides])


def test_a_reward_model_cannot_be_benchmarked(capsys, tmp_path, pairs_file, bench_files):
    cfg = {"run_dir": str(tmp_path / "run"), "init": str(tmp_path / "model"),
           "data": {"train": [str(pairs_file)]}, "eval": benchmark_section(bench_files)}
    (tmp_path / "rm.yaml").write_text(yaml.safe_dump(cfg))
    err = refused(capsys, tmp_path, ["rm", str(tmp_path / "rm.yaml")])
    assert "eval.tasks: a reward model has a scalar head" in err
