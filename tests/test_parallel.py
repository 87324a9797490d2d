"""Parallel layouts on CPU (gloo, real multi-process runs): every layout reproduces the single-process losses.

The same global batch (8 sequences of 64 tokens), seed and fp32 weights run as one process, DDP x2, FSDP2 x2
(ZeRO-3 and ZeRO-2), TP x2 (with and without sequence parallelism), PP x2 (GPipe, 1F1B, interleaved 1F1B), on 4
processes FSDP2 x TP, HSDP and PP x TP (both with activation checkpointing), PP x FSDP2, and on 8 processes
PP x FSDP2 x TP; a checkpoint saved under one layout resumes under another; a loss spike under
FSDP2 rolls every rank back to the sharded checkpoint. Layouts of one world size share one torchrun launch.

Tolerance: 2e-5 absolute on the per-step loss (about 4e-6 relative at loss ~5.6). The layouts sum the same
numbers in different orders (all-reduce vs reduce-scatter, sharded matmuls, micro-batched pipelines), so results
agree to fp32 rounding, amplified a little by Adam on near-zero gradients; observed differences are below 2e-6.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from forgeline.cli import main
from forgeline.config import ParallelConfig
from forgeline.errors import ConfigError
from forgeline.model import ModelConfig
from forgeline.parallel.layout import resolve_layout, split_layers

REPO = Path(__file__).resolve().parents[1]
DRIVER = Path(__file__).with_name("parallel_driver.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
TOL = 2e-5
STEPS = 4
MODEL = {"vocab_size": 512, "dim": 64, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2, "ffn_dim": 128,
         "max_seq_len": 128}


def write_base(path: Path, dataset: Path, **sections) -> Path:
    cfg = {
        "model": MODEL,
        "data": {"dataset": str(dataset), "seq_len": 64},
        "train": {"max_steps": STEPS, "decay_steps": STEPS, "micro_batch_size": 8, "lr": 3e-3, "warmup_steps": 1,
                  "precision": "fp32"},
        "checkpoint": {"every": 2, "keep_last": 3},
        "stability": {"max_rollbacks": 0},
        "monitor": {"val_every": STEPS, "val_batches": 2, "peak_flops": 1e11, "progress": False,
                    "tensorboard": False},
    }
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    path.write_text(yaml.safe_dump(cfg))
    return path


def read_metrics(run_dir: Path) -> tuple[dict[int, float], dict[int, float]]:
    train, val = {}, {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            train[record["step"]] = record["loss"]
        if "val_loss" in record:
            val[record["step"]] = record["val_loss"]
    return train, val


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(nproc: int, base: Path, root: Path, runs: list[dict], timeout: int = 900) -> None:
    spec = root / f"spec-{nproc}.json"
    spec.write_text(json.dumps({"config": str(base), "root": str(root), "runs": runs}))
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
         str(free_port()), str(DRIVER), str(spec)],
        env=ENV, capture_output=True, text=True, timeout=timeout, cwd=REPO,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]


MB4 = "train.micro_batch_size=4"  # 2 data-parallel ranks x 4 = the single process's 8 sequences
LAYOUTS_2 = {
    "ddp": [MB4],
    "fsdp_zero3": [MB4, "parallel.dp_shard=-1"],
    "fsdp_zero2": [MB4, "parallel.dp_shard=-1", "parallel.fsdp_reshard_after_forward=false"],
    "tp": ["parallel.tp=2"],
    "tp_no_sp": ["parallel.tp=2", "parallel.sequence_parallel=false"],
    "pp_gpipe": ["parallel.pp=2", "parallel.pp_schedule=gpipe"],
    "pp_1f1b": ["parallel.pp=2", "parallel.pp_schedule=1f1b", "parallel.pp_microbatches=4",
                "parallel.pp_split_points=[1]"],
    "pp_interleaved": ["parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b"],
}
BF16 = ["train.precision=bf16", "train.micro_batch_size=4", "parallel.dp_shard=-1"]  # FSDP2 MixedPrecisionPolicy
LAYOUTS_4 = {
    "fsdp_x_tp": ["train.micro_batch_size=4", "parallel.dp_shard=-1", "parallel.tp=2"],
    "hsdp": ["train.micro_batch_size=2", "parallel.dp_shard=2", "parallel.dp_replicate=2",
             "train.activation_checkpointing=true"],
    "pp_x_fsdp": ["train.micro_batch_size=4", "parallel.dp_shard=-1", "parallel.pp=2", "parallel.pp_schedule=gpipe"],
    "pp_x_tp": ["parallel.tp=2", "parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b",
                "train.activation_checkpointing=true"],
}
LAYOUTS_8 = {  # 3D: pipeline x FSDP2 x tensor parallel
    "pp_x_fsdp_x_tp": ["train.micro_batch_size=4", "parallel.dp_shard=-1", "parallel.tp=2", "parallel.pp=2"],
}
# (name, source run, layout it resumes under): saved on N ranks, resumed on M with another layout.
RESUMES_2 = {
    "fsdp_to_tp": ("fsdp_zero3", LAYOUTS_2["tp"]),
    "pp_to_fsdp": ("pp_interleaved", LAYOUTS_2["fsdp_zero3"]),
    "single_to_fsdp": ("single", LAYOUTS_2["fsdp_zero3"]),
    "tp_to_pp": ("tp", LAYOUTS_2["pp_1f1b"]),
    "fsdp_to_fsdp": ("fsdp_zero3", LAYOUTS_2["fsdp_zero3"]),
}
SPIKE = ["train.max_steps=6", "train.decay_steps=6", "stability.max_rollbacks=1", "stability.warmup_steps=2",
         "monitor.val_every=100"]
SPIKE_AT = 4  # the micro-batch of step 5: rolls back to the checkpoint of step 4


@pytest.fixture(scope="module")
def runs(tmp_path_factory, story_dataset):
    """Every layout's run directory; the single-process reference and the cross-layout resumes included."""
    root = tmp_path_factory.mktemp("parallel")
    base = write_base(root / "base.yaml", story_dataset)
    assert main(["pretrain", str(base), f"run_dir={root / 'single'}"]) == 0
    launch(8, base, root, [{"name": n, "overrides": o} for n, o in LAYOUTS_8.items()])
    launch(4, base, root, [{"name": n, "overrides": o} for n, o in LAYOUTS_4.items()])
    launch(2, base, root, [{"name": n, "overrides": o} for n, o in LAYOUTS_2.items()]
           + [{"name": n, "overrides": o, "resume_from": src} for n, (src, o) in RESUMES_2.items()]
           + [{"name": "fsdp_spike", "overrides": [MB4, "parallel.dp_shard=-1", *SPIKE], "spike_at": SPIKE_AT},
              {"name": "fsdp_bf16", "overrides": BF16}])
    # A sharded checkpoint of 4 ranks (FSDP2 x TP) resumed by one process.
    shutil.copytree(root / "fsdp_x_tp", root / "fsdp_x_tp_to_single")
    shutil.rmtree(sorted((root / "fsdp_x_tp_to_single" / "checkpoints").glob("step_*"))[-1])
    assert main(["pretrain", str(base), f"run_dir={root / 'fsdp_x_tp_to_single'}", "--resume"]) == 0
    return root


def assert_close_losses(got: dict[int, float], want: dict[int, float], name: str) -> None:
    assert sorted(got) == sorted(want), (name, sorted(got), sorted(want))
    for step in want:
        assert abs(got[step] - want[step]) < TOL, (name, step, got[step], want[step])


@pytest.mark.slow
@pytest.mark.parametrize("name", [*LAYOUTS_2, *LAYOUTS_4, *LAYOUTS_8])
def test_layout_matches_single_process_losses(runs, name):
    want_train, want_val = read_metrics(runs / "single")
    got_train, got_val = read_metrics(runs / name)
    assert sorted(want_train) == list(range(1, STEPS + 1))
    assert_close_losses(got_train, want_train, name)
    assert_close_losses(got_val, want_val, name + " (validation)")
    assert (runs / name / "model" / "model.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("name", [*RESUMES_2, "fsdp_x_tp_to_single"])
def test_checkpoint_resumes_under_another_layout(runs, name):
    want, _ = read_metrics(runs / "single")
    got, _ = read_metrics(runs / name)
    assert_close_losses(got, want, name)
    state = json.loads((runs / name / "checkpoints" / f"step_{STEPS:08d}" / "trainer_state.json").read_text())
    assert state["step"] == STEPS and state["data"]["batch_in_epoch"] == STEPS


@pytest.mark.slow
def test_same_layout_resume_is_exact(runs):
    want, _ = read_metrics(runs / "fsdp_zero3")
    got, _ = read_metrics(runs / "fsdp_to_fsdp")
    assert got == want  # bit for bit: model, AdamW state, schedule and data position restored from the DCP shards


@pytest.mark.slow
def test_fsdp2_bf16_mixed_precision_tracks_the_bf16_single_process_run(runs, tmp_path):
    """bf16 parameters for compute (FSDP2 MixedPrecisionPolicy), fp32 master weights and fp32 gradient reduction,
    against one process with bf16 autocast: not the same arithmetic (which ops round to bf16 differs), so the
    tolerance is loose; it catches a wrong scaling or a missing reduction, which would be off by far more."""
    assert main(["pretrain", str(runs / "base.yaml"), f"run_dir={tmp_path / 'single_bf16'}",
                 "train.precision=bf16"]) == 0
    want, _ = read_metrics(tmp_path / "single_bf16")
    got, _ = read_metrics(runs / "fsdp_bf16")
    assert sorted(got) == sorted(want)
    for step in want:
        assert abs(got[step] - want[step]) < 0.02, (step, got[step], want[step])


@pytest.mark.slow
def test_sharded_checkpoint_layout_on_disk(runs):
    ckpt = runs / "fsdp_x_tp" / "checkpoints" / "step_00000004"
    assert (ckpt / "dcp" / ".metadata").is_file()
    assert sorted(p.name for p in (ckpt / "rng").glob("*.safetensors")) == [f"rank_{r:05d}.safetensors"
                                                                             for r in range(4)]
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["format"] == "dcp" and meta["world_size"] == 4 and "FSDP2+TP" in meta["layout"]
    assert not list((runs / "fsdp_x_tp" / "checkpoints").glob(".*"))


@pytest.mark.slow
def test_consolidated_export_equals_the_single_process_weights(runs, tmp_path):
    from safetensors.torch import load_file

    want = load_file(str(runs / "single" / "model" / "model.safetensors"))
    for name in ("fsdp_zero3", "fsdp_x_tp", "pp_interleaved"):
        # the run's own final export is a consolidation of its last sharded checkpoint
        got = load_file(str(runs / name / "model" / "model.safetensors"))
        assert sorted(got) == sorted(want), name
        for key in want:
            torch.testing.assert_close(got[key], want[key], atol=2e-5, rtol=0, msg=f"{name}: {key}")
    out = tmp_path / "exported"
    assert main(["export", "consolidate", str(runs / "tp" / "checkpoints" / "step_00000004"), str(out)]) == 0
    from forgeline.model.formats.model_dir import read_model_dir

    model = read_model_dir(out).model
    assert model.cfg.n_layers == 4 and (out / "tokenizer.json").is_file()


@pytest.mark.slow
def test_spike_rollback_under_fsdp2_matches_one_process(runs, tmp_path, monkeypatch):
    import forgeline.recipes.pretrain as pretrain_module

    sys.path.insert(0, str(DRIVER.parent))
    from parallel_driver import spiking_loss

    monkeypatch.setattr(pretrain_module, "causal_lm_loss", spiking_loss(SPIKE_AT))
    assert main(["pretrain", str(runs / "base.yaml"), f"run_dir={tmp_path / 'single_spike'}", *SPIKE]) == 0
    events = [json.loads(line) for line in (runs / "fsdp_spike" / "events.jsonl").read_text().splitlines()]
    (rollback,) = [e for e in events if e["event"] == "rollback"]
    assert rollback["step"] == SPIKE_AT and rollback["to_step"] == 4
    want = [json.loads(line) for line in (tmp_path / "single_spike" / "metrics.jsonl").read_text().splitlines()]
    got = [json.loads(line) for line in (runs / "fsdp_spike" / "metrics.jsonl").read_text().splitlines()]
    want, got = [(r["step"], r["loss"]) for r in want if "loss" in r], [(r["step"], r["loss"]) for r in got
                                                                        if "loss" in r]
    assert [s for s, _ in got] == [s for s, _ in want] == list(range(1, 7))
    for (step, a), (_, b) in zip(got, want):
        assert abs(a - b) < TOL, (step, a, b)


# ---------------------------------------------------------------------------------------------------------------
# layouts and bad input (no processes started)
# ---------------------------------------------------------------------------------------------------------------


def test_layout_resolution():
    tiny = ModelConfig(**MODEL)
    assert resolve_layout(ParallelConfig(), 8).shape == (1, 8, 1, 1)  # default: DDP over everything
    layout = resolve_layout(ParallelConfig(dp_shard=-1, tp=2, pp=2), 16, tiny)
    assert layout.shape == (2, 1, 4, 2) and layout.dp == 4 and layout.uses_fsdp
    layout = resolve_layout(ParallelConfig(dp_replicate=2, dp_shard=-1), 8)
    assert layout.shape == (1, 2, 4, 1) and "HSDP" in layout.describe()
    # row-major ranks over (pp, dp_replicate, dp_shard, tp): tp ranks are neighbours, one data slice per dp rank
    assert [layout.dp_rank(r) for r in range(8)] == list(range(8))
    layout = resolve_layout(ParallelConfig(dp_shard=2, tp=2), 4)
    assert [layout.dp_rank(r) for r in range(4)] == [0, 0, 1, 1]
    assert [layout.coordinates(r)["tp"] for r in range(4)] == [0, 1, 0, 1]
    assert [list(r) for r in split_layers(10, 4)] == [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]]
    assert [list(r) for r in split_layers(4, 2, [1])] == [[0], [1, 2, 3]]


@pytest.mark.parametrize("parallel, world, model, message", [
    (dict(tp=3), 4, {}, "does not divide the world size 4"),
    (dict(dp_shard=2, tp=2, dp_replicate=2), 16, {}, "= 8 ranks, but the world size is 16"),
    (dict(tp=2), 2, dict(n_heads=3, dim=96, n_kv_heads=3), "parallel.tp=2 does not divide model.n_heads=3"),
    (dict(tp=4), 4, dict(n_kv_heads=2), "parallel.tp=4 does not divide model.n_kv_heads=2"),
    (dict(pp=8), 8, {}, "pipeline with 8 stages but the model has only n_layers=4"),
    (dict(pp=2, pp_schedule="interleaved_1f1b", pp_stages_per_rank=4), 2, {}, "8 stages but the model has only"),
    (dict(pp=2, pp_split_points=[1, 2]), 2, {}, "pp_split_points has 2 entries; 2 stages need 1"),
    (dict(pp=2, pp_split_points=[4]), 2, {}, "reaches beyond n_layers=4"),
    (dict(pp=2), 2, dict(tie_embeddings=True), "model.tie_embeddings with parallel.pp=2 is not supported"),
])
def test_bad_layouts_are_one_clear_error(parallel, world, model, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                       .replace("]", r"\]").replace("+", r"\+")):
        resolve_layout(ParallelConfig(**parallel), world, ModelConfig(**{**MODEL, **model}))


def test_cli_refuses_a_bad_layout_before_any_work(tmp_path, story_dataset, monkeypatch, capsys):
    base = write_base(tmp_path / "base.yaml", story_dataset)
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun would set it; the check runs before the process group
    assert main(["pretrain", str(base), f"run_dir={tmp_path / 'run'}", "parallel.tp=2", "model.n_kv_heads=1"]) == 2
    assert "parallel.tp=2 does not divide model.n_kv_heads=1" in capsys.readouterr().err
    assert main(["pretrain", str(base), f"run_dir={tmp_path / 'run'}", "parallel.pp=3"]) == 2
    assert "does not divide the world size 2" in capsys.readouterr().err
    assert main(["pretrain", str(base), f"run_dir={tmp_path / 'run'}", "parallel.dp_shard=0"]) == 2
    assert "parallel: Value error" not in (err := capsys.readouterr().err) and "dp_shard must be -1" in err
    assert main(["pretrain", str(base), f"run_dir={tmp_path / 'run'}", "parallel.dp_shard=-1",
                 "monitor.sample_every=5"]) == 2
    assert "monitor.sample_every needs the whole model on every rank" in capsys.readouterr().err
    assert main(["pretrain", str(base), f"run_dir={tmp_path / 'run'}", "parallel.backend=deepspeed",
                 "stability.max_rollbacks=2"]) == 2
    assert "set stability.max_rollbacks=0" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ddp", "fsdp_zero3", "tp", "pp_1f1b", "pp_interleaved", "fsdp_x_tp", "hsdp",
                                  "pp_x_fsdp", "pp_x_fsdp_x_tp"])
def test_memory_plan_matches_the_measured_parameter_and_optimizer_bytes(runs, name):
    report = json.loads((runs / name / "memory.json").read_text())
    estimate, measured = report["estimate"], report["measured_per_rank"]
    for key in ("params_bytes", "optimizer_bytes"):
        worst = max(m[key] for m in measured)
        assert abs(worst - estimate[key]) <= 0.10 * estimate[key], (name, key, worst, estimate[key])
        assert all(m[key] <= 1.10 * estimate[key] for m in measured), (name, key, measured, estimate[key])


def test_plan_memory_for_7b_and_70b(capsys):
    from forgeline.model.config import PRESETS, num_params

    assert main(["plan", "memory", "model.preset=7b", "parallel.dp_shard=-1", "train.micro_batch_size=1",
                 "data.seq_len=4096", "train.activation_checkpointing=true", "--world", "8", "--json"]) == 0
    est = json.loads(capsys.readouterr().out)
    n = num_params(ModelConfig(**PRESETS["7b"]))
    assert abs(est["params_bytes"] - 4 * n / 8) / (4 * n / 8) < 0.001  # fp32 master weights, 1/8 each
    assert est["optimizer_bytes"] == 2 * est["params_bytes"] and "FSDP2 (dp_shard=8" in est["layout"]
    assert 10 * 2**30 < est["total_bytes"] < 40 * 2**30
    assert main(["plan", "memory", "model.preset=70b", "parallel.tp=8", "parallel.pp=4", "parallel.dp_shard=-1",
                 "train.micro_batch_size=8", "parallel.pp_microbatches=8", "data.seq_len=4096",
                 "train.activation_checkpointing=true", "--world", "64"]) == 0
    out = capsys.readouterr().out
    assert "FSDP2+TP+PP (pp=4, dp_shard=2, tp=8; world 64)" in out and "total per rank" in out
    assert main(["plan", "memory", "model.preset=70b", "parallel.tp=8", "parallel.pp=4", "--world", "60"]) == 2
    assert "does not divide the world size 60" in capsys.readouterr().err


@pytest.mark.slow
def test_pretrain_nproc_launches_torchrun(runs, tmp_path):
    """`forgeline pretrain CONFIG --nproc 2` runs torchrun itself (here FSDP2 over the 2 processes)."""
    result = subprocess.run(
        [sys.executable, "-m", "forgeline", "pretrain", str(runs / "base.yaml"), f"run_dir={tmp_path / 'run'}",
         "parallel.dp_shard=-1", MB4, "train.max_steps=2", "monitor.val_every=100", "--nproc", "2"],
        env=ENV, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    got, _ = read_metrics(tmp_path / "run")
    want, _ = read_metrics(runs / "single")
    assert_close_losses(got, {s: want[s] for s in (1, 2)}, "--nproc 2")
    result = subprocess.run([sys.executable, "-m", "forgeline", "pretrain", str(runs / "base.yaml"),
                             f"run_dir={tmp_path / 'bad'}", "parallel.tp=4", "--nproc", "2"],
                            env=ENV, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 2 and "does not divide the world size 2" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "bad").exists()
