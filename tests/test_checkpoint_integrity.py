"""Checkpoint integrity: manifests, the verifier's damage cases, fallback to the newest intact checkpoint on resume,
resume modes, schedule changes on resume, warmup gradient alerts, the rollback count across resumes, and
`consolidate` / `export` / `generate` of damaged checkpoints and model dirs.

The damage is real: bytes cut off, zeroed, flipped or deleted in checkpoints that forgeline itself wrote.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from forgeline.cli import main
from forgeline.config import CheckpointConfig, PretrainConfig, StabilityConfig, load_config
from forgeline.errors import CheckpointError, ConfigError, CorruptCheckpointError, ForgelineError
from forgeline.objectives import causal_lm_loss
from forgeline import files as files_module
from forgeline.files import MANIFEST_NAME
from forgeline.model.formats.checkpoint import find_intact_checkpoint, list_checkpoints, verify_checkpoint
from forgeline.train.checkpoint import load_checkpoint, save_checkpoint
from forgeline.train.optim import LRSchedule
from forgeline.train.stability import TrainingDiverged

from test_pretrain import losses, write_config  # noqa: E402
from test_train import ListLoader, make_trainer, small_model, split_batch  # noqa: E402


# ---------------------------------------------------------------------------------------------------------------
# the verifier
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    """One real full checkpoint (a small model after one AdamW step)."""
    model = small_model()
    trainer = make_trainer(model, ListLoader(split_batch(torch.randint(0, 64, (2, 8)), torch.randint(0, 64, (2, 8)),
                                                         2)), tmp_path / "train", max_steps=1)
    trainer.fit()
    return save_checkpoint(tmp_path / "ckpts", 1, model=model, optimizer=trainer.optimizer,
                           trainer_state=trainer.trainer_state(), config_yaml="x: 1\n", keep_last=5)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _zero_bytes(path: Path) -> None:
    path.write_bytes(b"")


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # inside the last tensor (or the JSON's last character): same size, other contents
    path.write_bytes(bytes(data))


def _delete(path: Path) -> None:
    path.unlink()


def _garbage(path: Path) -> None:
    path.write_text("{not json")


DAMAGE = {
    "truncated weights": ("model.safetensors", _truncate, "model.safetensors has "),
    "zero-byte optimizer": ("optimizer.safetensors", _zero_bytes, "optimizer.safetensors is empty; the manifest says"),
    "flipped byte in the weights": ("model.safetensors", _flip_last_byte, "model.safetensors has changed since it "
                                                                          "was written"),
    "flipped byte in the trainer state": ("trainer_state.json", _flip_last_byte, "trainer_state.json has changed"),
    "missing rng file": ("rng.safetensors", _delete, "rng.safetensors is missing (listed in the manifest)"),
    "missing manifest": (MANIFEST_NAME, _delete, "manifest.json is missing: the save never finished"),
    "unreadable manifest": (MANIFEST_NAME, _garbage, "manifest.json is unreadable"),
}


def test_every_save_ends_with_a_manifest_of_every_file(checkpoint):
    manifest = json.loads((checkpoint / MANIFEST_NAME).read_text())
    files = sorted(p.name for p in checkpoint.iterdir() if p.name != MANIFEST_NAME)
    assert sorted(manifest["files"]) == files
    for name, entry in manifest["files"].items():
        assert entry["size"] == (checkpoint / name).stat().st_size
        assert len(entry["sha256"]) == 64
    assert json.loads((checkpoint / "meta.json").read_text())["manifest"] == MANIFEST_NAME
    verify_checkpoint(checkpoint)  # intact


@pytest.mark.parametrize("case", list(DAMAGE))
def test_the_verifier_names_the_damaged_file(checkpoint, case):
    name, damage, message = DAMAGE[case]
    damage(checkpoint / name)
    with pytest.raises(CorruptCheckpointError) as info:
        verify_checkpoint(checkpoint)
    assert message in str(info.value) and str(info.value).startswith(str(checkpoint / name))
    assert info.value.file == checkpoint / name and "\n" not in str(info.value)
    # load_checkpoint verifies before reading anything
    with pytest.raises(CorruptCheckpointError, match=name.replace(".", r"\.")):
        load_checkpoint(checkpoint, model=small_model(), optimizer=None)


def test_a_truncated_safetensors_file_is_caught_by_its_header_without_a_manifest(checkpoint):
    # A checkpoint from before manifests (its meta.json does not mention one) is checked by header and size.
    meta = json.loads((checkpoint / "meta.json").read_text())
    del meta["manifest"]
    (checkpoint / "meta.json").write_text(json.dumps(meta))
    (checkpoint / MANIFEST_NAME).unlink()
    verify_checkpoint(checkpoint)
    state = load_checkpoint(checkpoint, model=small_model(), optimizer=None)
    assert state["step"] == 1
    _truncate(checkpoint / "model.safetensors")
    with pytest.raises(CorruptCheckpointError, match="model.safetensors (has an invalid safetensors header length|is "
                                                     "truncated or overwritten)"):
        verify_checkpoint(checkpoint)
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(b"\x10\x00")
    with pytest.raises(CorruptCheckpointError, match="too short for a safetensors file"):
        verify_checkpoint(checkpoint)


def test_files_over_the_hash_limit_are_checked_by_size_and_header_only(tmp_path, monkeypatch):
    monkeypatch.setattr(files_module, "HASH_LIMIT", 1)
    model = small_model()
    trainer = make_trainer(model, ListLoader([]), tmp_path / "train")
    path = save_checkpoint(tmp_path / "ckpts", 1, model=model, optimizer=trainer.optimizer, trainer_state={},
                           config_yaml="", keep_last=1)
    entries = json.loads((path / MANIFEST_NAME).read_text())["files"].values()
    assert all(e["sha256"] is None for e in entries if e["size"] >= 1)
    _flip_last_byte(path / "model.safetensors")
    verify_checkpoint(path)  # not hashed: a flipped byte goes unseen ...
    _truncate(path / "model.safetensors")
    with pytest.raises(CorruptCheckpointError, match="the manifest says"):  # ... a cut one does not
        verify_checkpoint(path)


def test_damaged_checkpoints_are_renamed_and_ignored_by_listing_and_pruning(tmp_path):
    model = small_model()
    trainer = make_trainer(model, ListLoader([]), tmp_path / "train")
    root = tmp_path / "ckpts"
    for step in (1, 2, 3):
        save_checkpoint(root, step, model=model, optimizer=trainer.optimizer, trainer_state={}, config_yaml="",
                        keep_last=3)
    _truncate(root / "step_00000003" / "optimizer.safetensors")
    (root / "step_00000002" / "trainer_state.json").unlink()
    notes: list[str] = []
    found, damaged = find_intact_checkpoint(root, rename_damaged=False, report=notes.append)
    assert found == root / "step_00000001" and len(damaged) == 2 and notes == damaged
    assert [p.name for p in list_checkpoints(root)] == ["step_00000001", "step_00000002", "step_00000003"]
    found, damaged = find_intact_checkpoint(root, rename_damaged=True)
    assert found == root / "step_00000001"
    assert damaged[0].startswith("checkpoint step_00000003 is damaged (optimizer.safetensors has ")
    assert damaged[0].endswith("; renamed it step_00000003.corrupt")
    assert "trainer_state.json is missing" in damaged[1]
    assert [p.name for p in list_checkpoints(root)] == ["step_00000001"]
    for step in (4, 5):  # keep_last=1 prunes step_1 and step_4 but never a .corrupt directory
        save_checkpoint(root, step, model=model, optimizer=trainer.optimizer, trainer_state={}, config_yaml="",
                        keep_last=1)
    assert sorted(p.name for p in root.iterdir()) == ["step_00000002.corrupt", "step_00000003.corrupt",
                                                     "step_00000005"]
    # a second damaged step_3 does not overwrite the first one's remains
    shutil.rmtree(root / "step_00000005")
    save_checkpoint(root, 3, model=model, optimizer=trainer.optimizer, trainer_state={}, config_yaml="", keep_last=5)
    _zero_bytes(root / "step_00000003" / "model.safetensors")
    find_intact_checkpoint(root, rename_damaged=True)
    assert (root / "step_00000003.1.corrupt").is_dir() and (root / "step_00000003.corrupt").is_dir()


def test_model_dirs_get_a_manifest_and_older_ones_still_load(tmp_path):
    from forgeline.model.formats.model_dir import read_model_dir, save_model_dir

    model = small_model()
    out = save_model_dir(model, None, tmp_path / "model")
    assert set(json.loads((out / MANIFEST_NAME).read_text())["files"]) == {"model.safetensors",
                                                                           "forgeline_config.json"}
    read_model_dir(out)
    _flip_last_byte(out / "model.safetensors")
    with pytest.raises(CorruptCheckpointError, match="model.safetensors has changed since it was written"):
        read_model_dir(out)
    out = save_model_dir(model, None, tmp_path / "older")
    (out / MANIFEST_NAME).unlink()  # as written before manifests, or by `forgeline import`
    loaded = read_model_dir(out).model
    assert all(torch.equal(a, b) for a, b in zip(loaded.parameters(), model.parameters()))
    _truncate(out / "model.safetensors")
    with pytest.raises(CorruptCheckpointError, match="model.safetensors"):
        read_model_dir(out)


# ---------------------------------------------------------------------------------------------------------------
# pre-training: fallback on resume, resume modes, schedule changes (whole-model safetensors checkpoints)
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory, story_dataset):
    """A finished 12-step run with checkpoints at steps 4, 8 and 12; tests work on copies."""
    root = tmp_path_factory.mktemp("trained")
    cfg = write_config(root / "run.yaml", story_dataset, root / "run", train={"max_steps": 12},
                       checkpoint={"every": 4, "keep_last": 3}, monitor={"tensorboard": False})
    assert main(["pretrain", str(cfg)]) == 0
    assert [p.name for p in list_checkpoints(root / "run" / "checkpoints")] == [
        "step_00000004", "step_00000008", "step_00000012"]
    return root


def copy_run(trained: Path, tmp_path: Path) -> tuple[Path, Path]:
    run = tmp_path / "run"
    shutil.copytree(trained / "run", run)
    cfg = tmp_path / "run.yaml"
    cfg.write_text((trained / "run.yaml").read_text().replace(str(trained / "run"), str(run)))
    return run, cfg


def test_resume_passes_over_a_damaged_checkpoint_to_the_newest_intact_one(trained, tmp_path, capsys):
    run, cfg = copy_run(trained, tmp_path)
    expected = losses(run)
    _truncate(run / "checkpoints" / "step_00000012" / "model.safetensors")
    _flip_last_byte(run / "checkpoints" / "step_00000008" / "optimizer.safetensors")
    capsys.readouterr()
    assert main(["pretrain", str(cfg), "--resume"]) == 0
    err = capsys.readouterr().err
    assert "checkpoint step_00000012 is damaged (model.safetensors has " in err
    assert "renamed it step_00000012.corrupt" in err
    assert "checkpoint step_00000008 is damaged (optimizer.safetensors has changed since it was written" in err
    assert "resumed from step 4" in err and "Traceback" not in err
    assert losses(run) == expected  # steps 5-12 again, bit for bit
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["step_00000004", "step_00000008", "step_00000008.corrupt", "step_00000012",
                     "step_00000012.corrupt"]
    verify_checkpoint(run / "checkpoints" / "step_00000012")


def test_resume_with_no_intact_checkpoint_is_one_error(trained, tmp_path, capsys):
    run, cfg = copy_run(trained, tmp_path)
    for step in (4, 8, 12):
        _delete(run / "checkpoints" / f"step_{step:08d}" / MANIFEST_NAME)
    capsys.readouterr()
    assert main(["pretrain", str(cfg), "--resume"]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"forgeline: error: --resume: no intact checkpoint in {run / 'checkpoints'} "
                           "(3 damaged, renamed *.corrupt")
    assert "manifest.json is missing" in last and "Traceback" not in err
    assert not list_checkpoints(run / "checkpoints")


def _config(cfg_file: Path, *overrides: str) -> PretrainConfig:
    return load_config(PretrainConfig, cfg_file, list(overrides))


def test_resume_modes(tmp_path, story_dataset, capsys):
    from forgeline.recipes.pretrain import pretrain

    run = tmp_path / "run"
    cfg_file = write_config(tmp_path / "run.yaml", story_dataset, run, train={"max_steps": 4},
                            checkpoint={"every": 2}, monitor={"tensorboard": False})
    # --resume where there is nothing to resume: one error, nothing written
    assert main(["pretrain", str(cfg_file), "--resume"]) == 2
    err = capsys.readouterr().err
    assert f"--resume: run_dir={run} has no checkpoint to resume from" in err and "--resume=auto" in err
    assert not (run / "checkpoints").exists()
    with pytest.raises(ConfigError, match="expected False, True or 'auto'"):
        pretrain(_config(cfg_file), resume="yes")
    # "auto": a fresh start, said in one line
    outcome = pretrain(_config(cfg_file), resume="auto")
    assert outcome.result.steps == 4 and not outcome.preempted
    err = capsys.readouterr().err
    assert f"--resume=auto: run_dir={run} has no checkpoint to resume from; starting a new run at step 0" in err
    # "auto" with a checkpoint: resumed
    outcome = pretrain(_config(cfg_file, "train.max_steps=6", "train.decay_steps=4"), resume="auto")
    assert outcome.result.steps == 6
    err = capsys.readouterr().err
    assert "resumed from step 4" in err and "resume: train." not in err  # max_steps changed, the schedule did not
    # "auto" where every checkpoint is damaged: they are set aside and a new run starts
    for ckpt in list_checkpoints(run / "checkpoints"):
        _truncate(ckpt / "model.safetensors")
    outcome = pretrain(_config(cfg_file), resume="auto")
    err = capsys.readouterr().err
    assert "--resume=auto: no intact checkpoint in" in err and "starting a new run at step 0" in err
    assert outcome.result.steps == 4 and sorted(losses(run)) == [1, 2, 3, 4]


def test_resume_with_another_schedule_says_how_the_learning_rate_changes(trained, tmp_path, capsys):
    run, cfg = copy_run(trained, tmp_path)
    shutil.rmtree(run / "checkpoints" / "step_00000012")
    capsys.readouterr()
    assert main(["pretrain", str(cfg), "--resume", "train.max_steps=20", "train.lr=2e-3"]) == 0
    err = capsys.readouterr().err
    old = LRSchedule(3e-3, 2, 12, 0.1).lr_at(8)
    new = LRSchedule(2e-3, 2, 20, 0.1).lr_at(8)
    assert (f"resume: train.lr 0.003 -> 0.002, train.max_steps 12 -> 20; the learning rate at step 8 changes from "
            f"{old:.1e} to {new:.1e}") in err, err
    lr_at_9 = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
               if json.loads(line).get("step") == 9 and "lr" in json.loads(line)]
    assert lr_at_9[0]["lr"] == pytest.approx(new)


# ---------------------------------------------------------------------------------------------------------------
# the loop: warmup gradient alerts, the rollback count across a resume
# ---------------------------------------------------------------------------------------------------------------


def test_gradient_alerts_during_warmup_are_counted_not_printed(tmp_path, capsys):
    batches = split_batch(torch.randint(0, 64, (2, 8)), torch.randint(0, 64, (2, 8)), 2)
    trainer = make_trainer(small_model(), ListLoader(batches), tmp_path, max_steps=5, warmup_steps=3,
                           stability=StabilityConfig(max_rollbacks=0, grad_norm_alert=1e-9))
    result = trainer.fit()
    err = capsys.readouterr().err
    assert "[grad_norm_alert] step 0" not in err and "[grad_norm_alert] step 2" not in err
    assert "[grad_norm_alert] step 3" in err and "[grad_norm_alert] step 4" in err
    assert "gradient-norm alerts" in err and "3 in warmup, 2 after (events.jsonl)" in err
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert [(e["step"], e["warmup"]) for e in events if e["event"] == "grad_norm_alert"] == [
        (0, True), (1, True), (2, True), (3, False), (4, False)]
    assert len(result.events) == 5


class SpikeLoader:
    """The real loader; the micro-batches with these global indices are marked to spike (the loss x 10)."""

    def __init__(self, inner, spikes):
        self.inner, self.spikes, self.count = inner, set(spikes), 0

    def __next__(self):
        batch = dict(next(self.inner), spike=self.count in self.spikes)
        self.count += 1
        return batch

    def state_dict(self):
        return {"inner": self.inner.state_dict(), "count": self.count}

    def load_state_dict(self, state):
        self.inner.load_state_dict(state["inner"])
        self.count = state["count"]


def spiking_loss(model, batch):
    out = causal_lm_loss(model, batch)
    return dataclasses.replace(out, loss=out.loss * 10 if batch["spike"] else out.loss)


def test_the_rollback_count_survives_a_resume(tmp_path, story_dataset):
    from forgeline.data import PackedTokenLoader

    def trainer(max_steps, spikes):
        loader = SpikeLoader(PackedTokenLoader(story_dataset, seq_len=32, micro_batch_size=4, seed=0), spikes)
        return make_trainer(small_model(vocab=512), loader, tmp_path, loss_fn=spiking_loss, max_steps=max_steps,
                            lr=3e-3, warmup_steps=2, stability=StabilityConfig(max_rollbacks=1, warmup_steps=3),
                            checkpoint=CheckpointConfig(every=4, keep_last=2))

    first = trainer(10, spikes={6})
    assert first.fit().rollbacks == 1
    assert json.loads((tmp_path / "checkpoints" / "step_00000010" / "trainer_state.json").read_text())[
        "rollbacks"] == 1
    # a second spike after the resume is the run's second rollback: over max_rollbacks=1
    second = trainer(20, spikes={6, 14})
    with pytest.raises(TrainingDiverged, match="after 1 rollbacks"):
        second.fit(resume=True)
    assert second.rollbacks == 2


def test_trainer_resume_true_without_a_checkpoint_is_an_error(tmp_path):
    trainer = make_trainer(small_model(), ListLoader([]), tmp_path)
    with pytest.raises(CheckpointError, match="nothing to resume"):
        trainer.fit(resume=True)


# ---------------------------------------------------------------------------------------------------------------
# consolidate, export and generate
# ---------------------------------------------------------------------------------------------------------------


def test_consolidate_takes_a_run_dir_and_refuses_to_overwrite(trained, tmp_path, capsys):
    from safetensors.torch import load_file

    from forgeline.parallel.checkpoint import consolidate

    run, _ = copy_run(trained, tmp_path)
    out = tmp_path / "out"
    consolidate(run, out)  # the run's newest checkpoint: step 12, the same weights as its final model
    final, got = load_file(str(run / "model" / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert got.keys() == final.keys() and all(torch.equal(got[k], v) for k, v in final.items())
    with pytest.raises(ForgelineError, match=f"{out} already exists; pass --overwrite"):
        consolidate(run, out)
    # a checkpoints dir whose newest checkpoint is damaged: the next one, said in a line, nothing renamed
    _truncate(run / "checkpoints" / "step_00000012" / "model.safetensors")
    capsys.readouterr()
    consolidate(run / "checkpoints", out, overwrite=True)
    assert "checkpoint step_00000012 is damaged (model.safetensors has " in capsys.readouterr().err
    assert (run / "checkpoints" / "step_00000012").is_dir()
    step8 = load_file(str(run / "checkpoints" / "step_00000008" / "model.safetensors"))
    got = load_file(str(out / "model.safetensors"))
    assert all(torch.equal(got[k], v) for k, v in step8.items())
    # the CLI: a damaged checkpoint given directly is one error naming the file
    capsys.readouterr()
    assert main(["export", "consolidate", str(run / "checkpoints" / "step_00000012"), str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"forgeline: error: {run / 'checkpoints' / 'step_00000012' / 'model.safetensors'} has ")
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "x").exists()


def test_export_and_generate_of_damaged_checkpoints_and_model_dirs_exit_2(trained, tmp_path, capsys):
    run, _ = copy_run(trained, tmp_path)
    ckpt = run / "checkpoints" / "step_00000012"
    _flip_last_byte(ckpt / "model.safetensors")
    _flip_last_byte(run / "model" / "model.safetensors")
    for argv, damaged in (
        (["export", "hf", str(ckpt), str(tmp_path / "hf")], ckpt / "model.safetensors"),
        (["generate", str(ckpt), "--prompt", "Once", "--max-new-tokens", "2"], ckpt / "model.safetensors"),
        (["generate", str(run / "model"), "--prompt", "Once", "--max-new-tokens", "2"],
         run / "model" / "model.safetensors"),
        (["export", "hf", str(run), str(tmp_path / "hf")], run / "model" / "model.safetensors"),
    ):
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith(f"forgeline: error: {damaged} has changed since it was written"), err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
        assert not (tmp_path / "hf").exists()
    # a run dir without model/: its newest intact checkpoint
    shutil.rmtree(run / "model")
    capsys.readouterr()
    assert main(["export", "hf", str(run), str(tmp_path / "hf")]) == 0
    assert "checkpoint step_00000012 is damaged" in capsys.readouterr().err
