"""`peft:` as a step of a training stage (SFT here): only adapter weights train and are checkpointed, with the base
referenced by hash; resume is exact; the run ends with an adapter directory; DDP and FSDP2 runs match one process;
activation checkpointing is unchanged; bad settings are one clear error before training starts."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors import safe_open

from forgeline.cli import main
from test_sft import ENV, base_run, chat_data, losses, run_cli, sft_config  # noqa: F401  (fixtures)

LORA = {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0}


def peft_config(tmp_path, base_run, chat_data, run, name="x.yaml", peft=None, **sections):
    path = sft_config(tmp_path / name, base_run, chat_data, run, **sections)
    cfg = yaml.safe_load(path.read_text())
    cfg["peft"] = {**LORA, **(peft or {})}
    path.write_text(yaml.safe_dump(cfg))
    return path


def checkpoints(run):
    return sorted((run / "checkpoints").glob("step_*"))


@pytest.mark.parametrize("method", ["lora", "dora", "qlora", "adapter"])
def test_an_adapter_run_trains_and_saves_only_its_adapters(tmp_path, base_run, chat_data, capsys, method):
    run = tmp_path / "run"
    cfg = peft_config(tmp_path, base_run, chat_data, run, peft={"method": method, "adapter_size": 8},
                      train={"epochs": 1})
    assert main(["sft", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert f"peft: {method} on" in out and "trainable of" in out
    train = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert train and all(torch.isfinite(torch.tensor(r["loss"])) for r in train)
    last = checkpoints(run)[-1]
    with safe_open(str(last / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    adapter_words = ("lora_A", "lora_B", "lora_magnitude") if method != "adapter" else ("down.", "up.")
    assert keys and all(any(w in k for w in adapter_words) for k in keys), sorted(keys)[:5]
    state = json.loads((last / "trainer_state.json").read_text())
    assert state["weights"] == "trainable" and state["base"]["method"] == method
    assert len(state["base"]["sha256"]) == 64
    adapter = run / "adapter"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    assert json.loads((adapter / "forgeline_base.json").read_text())["sha256"] == state["base"]["sha256"]
    assert (adapter / "tokenizer" / "tokenizer.json").is_file() and not (run / "model").exists()


def test_resume_of_an_adapter_run_reproduces_the_uninterrupted_losses(tmp_path, base_run, chat_data):
    sections = dict(train={"epochs": 3, "global_batch_samples": 8}, checkpoint={"every": 4, "keep_last": 20})
    straight = tmp_path / "straight"
    cfg = peft_config(tmp_path, base_run, chat_data, straight, **sections)
    result = run_cli("sft", cfg)
    assert result.returncode == 0, result.stderr
    expected = losses(straight)
    assert max(expected) > 9
    # the run as it stood after step 8 (a stop there): its checkpoints up to step 8, its metrics up to step 8
    stopped = tmp_path / "stopped"
    shutil.copytree(straight, stopped)
    shutil.rmtree(stopped / "adapter")
    for ckpt in checkpoints(stopped):
        if int(ckpt.name.split("_")[1]) > 8:
            shutil.rmtree(ckpt)
    kept = [line for line in (stopped / "metrics.jsonl").read_text().splitlines() if json.loads(line)["step"] <= 8]
    (stopped / "metrics.jsonl").write_text("\n".join(kept) + "\n")
    moved = yaml.safe_load(cfg.read_text())
    moved["run_dir"] = str(stopped)
    cfg.write_text(yaml.safe_dump(moved))
    resumed = run_cli("sft", cfg, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    got = losses(stopped)
    assert set(got) == set(expected)
    for step, loss in expected.items():
        assert got[step] == pytest.approx(loss, abs=1e-6), step
    a = safe_open(str(straight / "adapter" / "adapter_model.safetensors"), "pt")
    b = safe_open(str(stopped / "adapter" / "adapter_model.safetensors"), "pt")
    for key in a.keys():
        torch.testing.assert_close(b.get_tensor(key), a.get_tensor(key), atol=1e-6, rtol=0)


def test_resume_on_another_base_is_refused_before_training(tmp_path, base_run, chat_data):
    run = tmp_path / "run"
    cfg = peft_config(tmp_path, base_run, chat_data, run, train={"epochs": None, "max_steps": 2})
    assert main(["sft", str(cfg)]) == 0
    # another base of the same shape: the pre-trained run's weights changed
    from forgeline.model.formats import load_model
    from forgeline.model.formats.model_dir import save_model_dir

    other = load_model(base_run)
    with torch.no_grad():
        other.model.tok_embeddings.weight.mul_(1.01)
    save_model_dir(other.model, other.tokenizer, tmp_path / "other")
    moved = yaml.safe_load(cfg.read_text())
    moved["init"] = str(tmp_path / "other")
    moved["train"]["max_steps"] = 4
    cfg.write_text(yaml.safe_dump(moved))
    result = run_cli("sft", cfg, "--resume")
    assert result.returncode == 2
    assert "another base" in result.stderr and "Traceback" not in result.stderr
    assert len(losses(run)) == 2  # nothing trained


@pytest.mark.parametrize("peft, words", [
    ({"target_modules": ["q_proj", "attn_qkv"]}, ["attn_qkv", "wq", "w2"]),
    ({"r": 200}, ["peft.r=200", "larger than the layer"]),
    ({"method": "lora", "base_dtype": "bf16"}, ["base_dtype"]),
])
def test_bad_adapter_settings_are_one_error_before_training(tmp_path, base_run, chat_data, peft, words):
    run = tmp_path / "run"
    result = run_cli("sft", peft_config(tmp_path, base_run, chat_data, run, peft=peft))
    assert result.returncode == 2, result.stderr
    assert all(w in result.stderr for w in words), result.stderr
    assert "Traceback" not in result.stderr and not (run / "metrics.jsonl").exists()


def test_tensor_parallel_adapters_are_refused_before_any_process_starts(tmp_path, base_run, chat_data):
    result = run_cli("sft", peft_config(tmp_path, base_run, chat_data, tmp_path / "run", parallel={"tp": 2}),
                     "--nproc", "2")
    assert result.returncode == 2 and "DDP and FSDP2" in result.stderr and "torch.distributed" not in result.stderr


def test_activation_checkpointing_keeps_the_losses(tmp_path, base_run, chat_data):
    plain, ckpt = tmp_path / "plain", tmp_path / "ckpt"
    steps = {"epochs": None, "max_steps": 3}
    assert main(["sft", str(peft_config(tmp_path, base_run, chat_data, plain, "a.yaml", train=steps))]) == 0
    assert main(["sft", str(peft_config(tmp_path, base_run, chat_data, ckpt, "b.yaml",
                                        train={**steps, "activation_checkpointing": True}))]) == 0
    a, b = losses(plain), losses(ckpt)
    assert a.keys() == b.keys()
    for step in a:
        assert b[step] == pytest.approx(a[step], abs=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("layout, method, precision", [({}, "lora", "fp32"), ({"dp_shard": -1}, "lora", "fp32"),
                                                       ({"dp_shard": -1}, "lora", "bf16"),
                                                       ({"dp_shard": -1}, "qlora", "bf16")],
                         ids=["ddp", "fsdp2", "fsdp2-lora-bf16", "fsdp2-qlora-bf16"])
def test_two_ranks_match_one_process(tmp_path, base_run, chat_data, layout, method, precision):
    # bf16 stores the frozen base in bf16 beside fp32 adapters: FSDP2 must shard the mixed dtypes alike
    steps = {"epochs": None, "max_steps": 3, "micro_batch_size": 2, "global_batch_samples": None,
             "precision": precision}
    peft = {"method": method}
    single = tmp_path / "single"
    assert main(["sft", str(peft_config(tmp_path, base_run, chat_data, single, "a.yaml", peft=peft,
                                        train={**steps, "micro_batch_size": 4}, data={"shuffle": False}))]) == 0
    multi = tmp_path / "multi"
    result = run_cli("sft", peft_config(tmp_path, base_run, chat_data, multi, "b.yaml", peft=peft, train=steps,
                                        data={"shuffle": False}, parallel=layout), "--nproc", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = losses(single), losses(multi)
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-4 if precision == "fp32" else 2e-2), step
    assert (multi / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_compiled_blocks_train_adapters_like_eager(tmp_path, base_run, chat_data):
    steps = {"epochs": None, "max_steps": 2}
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    assert main(["sft", str(peft_config(tmp_path, base_run, chat_data, eager, "a.yaml", train=steps))]) == 0
    assert main(["sft", str(peft_config(tmp_path, base_run, chat_data, compiled, "b.yaml",
                                        train={**steps, "compile": True}))]) == 0
    a, b = losses(eager), losses(compiled)
    assert a.keys() == b.keys()
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-4)
