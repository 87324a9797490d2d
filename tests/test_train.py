"""The one training loop: update invariance, schedule, checkpoints, stability (NaN skip, spike rollback)."""

import dataclasses
import copy
import json
import math

import pytest
import torch

from forgeline.config import CheckpointConfig, MonitorConfig, StabilityConfig, TrainConfig
from forgeline.data import PackedTokenLoader
from forgeline.model import ModelConfig, build_model
from forgeline.objectives import causal_lm_loss
from forgeline.model.formats.checkpoint import latest_checkpoint, list_checkpoints
from forgeline.train.checkpoint import load_checkpoint, save_checkpoint
from forgeline.train.distributed import DistInfo
from forgeline.train.optim import LRSchedule, param_groups, resolve_schedule
from forgeline.train.stability import TrainingDiverged
from forgeline.train.trainer import Trainer

QUIET = MonitorConfig(tensorboard=False, progress=False, val_every=10_000)


class ListLoader:
    """A stateful loader over fixed batches (cycled), for tests that need exact control of the data."""

    def __init__(self, batches):
        self.batches, self.position = batches, 0

    def __next__(self):
        batch = self.batches[self.position % len(self.batches)]
        self.position += 1
        return batch

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]


def small_model(seed=0, vocab=64):
    torch.manual_seed(seed)
    return build_model(ModelConfig(vocab_size=vocab, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                                   max_seq_len=64))


def make_trainer(model, loader, tmp_path, *, accum=1, loss_fn=causal_lm_loss, stability=None, checkpoint=None,
                 **train_kw):
    train = TrainConfig(**{"max_steps": 3, "warmup_steps": 0, "lr": 1e-2, "precision": "fp32", **train_kw})
    return Trainer(model=model, loss_fn=loss_fn, train_loader=loader, train=train,
                   checkpoint=checkpoint or CheckpointConfig(every=1000), monitor=QUIET,
                   stability=stability or StabilityConfig(max_rollbacks=0), run_dir=tmp_path, config_yaml="",
                   dist=DistInfo(), grad_accum_steps=accum)


def split_batch(input_ids, targets, size):
    out = []
    for i in range(0, input_ids.shape[0], size):
        t = targets[i : i + size]
        out.append({"input_ids": input_ids[i : i + size], "targets": t, "n_targets": int((t != -100).sum())})
    return out


def test_update_is_the_same_for_any_micro_batch_accumulation_split(tmp_path):
    torch.manual_seed(1)
    input_ids = torch.randint(0, 64, (4, 16))
    targets = torch.randint(0, 64, (4, 16))
    # Uneven numbers of targets per sequence: a mean of per-micro-batch means would weight them wrongly.
    targets[0, :12] = -100
    targets[2, 3:5] = -100
    params = {}
    for micro in (4, 2, 1):
        model = small_model()
        trainer = make_trainer(model, ListLoader(split_batch(input_ids, targets, micro)), tmp_path / str(micro),
                               accum=4 // micro, max_steps=1, eps=1e-4)
        trainer.fit()
        params[micro] = torch.cat([p.detach().flatten() for p in model.parameters()])
    # eps=1e-4 keeps Adam's first step (about lr * sign(g)) from amplifying float rounding in near-zero gradients.
    # Reference: one step on the whole batch with the mean over all 50 valid targets, by hand.
    model = small_model()
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-2, betas=(0.9, 0.95), eps=1e-4)
    loss = torch.nn.functional.cross_entropy(model(input_ids).flatten(0, 1), targets.flatten(), ignore_index=-100)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    reference = torch.cat([p.detach().flatten() for p in model.parameters()])
    for micro, got in params.items():
        torch.testing.assert_close(got, reference, atol=1e-7, rtol=0, msg=f"micro batch {micro}")


def test_warmup_then_cosine_to_min_lr():
    s = LRSchedule(lr=1.0, warmup_steps=10, decay_steps=110, min_lr_ratio=0.1)
    assert s.lr_at(0) == pytest.approx(0.1)
    assert s.lr_at(9) == pytest.approx(1.0)
    assert s.lr_at(60) == pytest.approx(0.1 + 0.9 * 0.5)
    assert s.lr_at(110) == pytest.approx(0.1)
    assert s.lr_at(500) == pytest.approx(0.1)
    lrs = [s.lr_at(i) for i in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_linear_and_constant_schedules():
    linear = LRSchedule(lr=1.0, warmup_steps=10, decay_steps=110, min_lr_ratio=0.0, shape="linear")
    assert linear.lr_at(9) == pytest.approx(1.0)
    assert linear.lr_at(60) == pytest.approx(0.5)
    assert linear.lr_at(110) == pytest.approx(0.0)
    constant = LRSchedule(lr=1.0, warmup_steps=10, decay_steps=110, min_lr_ratio=0.1, shape="constant")
    assert constant.lr_at(4) == pytest.approx(0.5)
    assert [constant.lr_at(i) for i in (10, 60, 500)] == [1.0, 1.0, 1.0]


def test_epochs_and_warmup_ratio_resolve_to_steps():
    from forgeline.config import TrainConfig

    train = resolve_schedule(TrainConfig(max_steps=None, epochs=3, warmup_ratio=0.03), steps_per_epoch=70)
    assert train.max_steps == 210 and train.warmup_steps == 7  # ceil(0.03 * 210)
    half = resolve_schedule(TrainConfig(max_steps=None, epochs=0.5, warmup_ratio=0.0), steps_per_epoch=7)
    assert half.max_steps == 4 and half.warmup_steps == 0
    explicit = resolve_schedule(TrainConfig(max_steps=50, epochs=3, warmup_steps=5), steps_per_epoch=70)
    assert explicit.max_steps == 50 and explicit.warmup_steps == 5  # a set max_steps wins over epochs
    with pytest.raises(ValueError, match="epochs"):
        resolve_schedule(TrainConfig(max_steps=None, epochs=1), steps_per_epoch=None)


def test_weight_decay_only_on_linear_weights():
    model = build_model(ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=4, ffn_dim=64, qkv_bias=True,
                                    tie_embeddings=True))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    decayed = {names[id(p)] for p in decay["params"]}
    assert decayed == {f"layers.0.attention.{w}.weight" for w in ("wq", "wk", "wv", "wo")} | {
        f"layers.0.feed_forward.{w}.weight" for w in ("w1", "w2", "w3")}
    assert {names[id(p)] for p in no_decay["params"]} >= {"tok_embeddings.weight", "norm.weight",
                                                          "layers.0.attention.wq.bias"}


def test_checkpoint_roundtrip_is_exact_and_atomic(tmp_path, monkeypatch):
    model = small_model()
    trainer = make_trainer(model, ListLoader(split_batch(torch.randint(0, 64, (2, 8)), torch.randint(0, 64, (2, 8)),
                                                         2)), tmp_path, max_steps=2)
    trainer.fit()
    root = tmp_path / "ckpts"
    for step in (1, 2, 3):
        save_checkpoint(root, step, model=model, optimizer=trainer.optimizer, trainer_state={"data": {"p": step}},
                        config_yaml="x: 1\n", keep_last=2)
    assert [p.name for p in list_checkpoints(root)] == ["step_00000002", "step_00000003"]
    clone = small_model(seed=5)
    opt = make_trainer(clone, ListLoader([]), tmp_path / "other").optimizer
    state = load_checkpoint(latest_checkpoint(root), model=clone, optimizer=opt)
    assert state["data"] == {"p": 3}
    for a, b in zip(model.parameters(), clone.parameters()):
        assert torch.equal(a, b)
    saved, restored = trainer.optimizer.state_dict()["state"], opt.state_dict()["state"]
    assert saved.keys() == restored.keys()
    for idx in saved:
        assert all(torch.equal(saved[idx][k], restored[idx][k]) for k in saved[idx])
    # A save that dies half-way leaves no step_* directory and no temp directory.
    import forgeline.train.checkpoint as ckpt_module

    real_save = ckpt_module.save_file

    def failing_save(tensors, path, metadata=None):
        if path.endswith("optimizer.safetensors"):
            raise OSError("disk full")
        return real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(ckpt_module, "save_file", failing_save)
    with pytest.raises(OSError):
        save_checkpoint(root, 4, model=model, optimizer=trainer.optimizer, trainer_state={}, config_yaml="",
                        keep_last=2)
    assert sorted(p.name for p in root.iterdir()) == ["step_00000002", "step_00000003"]


def test_nonfinite_loss_skips_the_update_and_the_run_completes(tmp_path):
    torch.manual_seed(0)
    batches = split_batch(torch.randint(0, 64, (4, 8)), torch.randint(0, 64, (4, 8)), 2)
    for b in batches:
        b["poison"] = False
    batches[1] = dict(batches[1], poison=True)  # the second step's only micro-batch

    def loss_fn(model, batch):
        out = causal_lm_loss(model, batch)
        return dataclasses.replace(out, loss=out.loss * float("nan") if batch["poison"] else out.loss)

    model = small_model()
    seen = []

    class Spy(ListLoader):
        def __next__(self):
            seen.append([p.detach().clone() for p in model.parameters()])
            return super().__next__()

    trainer = make_trainer(model, Spy(batches), tmp_path, loss_fn=loss_fn, max_steps=4)
    result = trainer.fit()
    assert result.steps == 4 and result.skipped_nonfinite == 2  # steps 1 and 3 both draw the poisoned batch
    assert [e["event"] for e in result.events] == ["nonfinite", "nonfinite"]
    assert all(torch.equal(a, b) for a, b in zip(seen[1], seen[2]))  # step 1 changed nothing
    assert not all(torch.equal(a, b) for a, b in zip(seen[0], seen[1]))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert events[0]["event"] == "nonfinite" and events[0]["step"] == 1


class PoisonLoader:
    """Wraps the real loader; micro-batches whose global index is in `poison` are replaced by random tokens."""

    def __init__(self, inner, poison, vocab):
        self.inner, self.poison, self.vocab, self.count = inner, set(poison), vocab, 0

    def __next__(self):
        batch = next(self.inner)
        if self.count in self.poison:
            g = torch.Generator().manual_seed(self.count)
            noise = torch.randint(0, self.vocab, batch["input_ids"].shape, generator=g)
            batch = dict(batch, input_ids=noise, targets=torch.roll(noise, -1, 1), doc_ids=None)
        self.count += 1
        return batch

    def state_dict(self):
        return {"inner": self.inner.state_dict(), "count": self.count}

    def load_state_dict(self, state):
        self.inner.load_state_dict(state["inner"])
        self.count = state["count"]


def test_loss_spike_rolls_back_to_the_last_checkpoint_and_skips_the_window(tmp_path, story_dataset):
    loader = PackedTokenLoader(story_dataset, seq_len=64, micro_batch_size=8, seed=0)
    poisoned = PoisonLoader(loader, poison={42}, vocab=512)
    model = small_model(vocab=512)
    trainer = make_trainer(model, poisoned, tmp_path, max_steps=50, lr=2e-2, warmup_steps=5,
                           stability=StabilityConfig(max_rollbacks=2, warmup_steps=10),
                           checkpoint=CheckpointConfig(every=20, keep_last=2))
    result = trainer.fit()
    assert result.steps == 50 and result.rollbacks == 1
    (event,) = [e for e in result.events if e["event"] == "rollback"]
    assert event["step"] == 42 and event["to_step"] == 40
    assert event["skipped_batches"] == 3  # steps 40, 41 and the spike at 42
    assert event["loss"] > 2 * min(h["loss"] for h in result.history)
    # The skipped window is never trained on: after the rollback the loader continues behind the poison.
    assert poisoned.count == 50 + 3
    steps = [h["step"] for h in result.history]
    # Steps 41 and 42 were trained, rolled back, and trained again on the data after the spike.
    assert steps == list(range(1, 43)) + list(range(41, 51))
    assert result.history[-1]["loss"] < 3.0
    assert (tmp_path / "checkpoints" / "step_00000050").is_dir()


def test_repeated_spikes_stop_the_run_with_a_clear_message(tmp_path, story_dataset):
    loader = PackedTokenLoader(story_dataset, seq_len=64, micro_batch_size=8, seed=0)
    poisoned = PoisonLoader(loader, poison=set(range(30, 1000)), vocab=512)
    trainer = make_trainer(small_model(vocab=512), poisoned, tmp_path, max_steps=60, lr=2e-2, warmup_steps=5,
                           stability=StabilityConfig(max_rollbacks=2, warmup_steps=10),
                           checkpoint=CheckpointConfig(every=10))
    with pytest.raises(TrainingDiverged, match="after 2 rollbacks; the run is unstable"):
        trainer.fit()
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events].count("rollback") == 2


def test_bf16_autocast_keeps_fp32_master_weights(tmp_path, story_dataset):
    loader = PackedTokenLoader(story_dataset, seq_len=32, micro_batch_size=4, seed=0)
    model = small_model(vocab=512)
    result = make_trainer(model, loader, tmp_path, max_steps=5, precision="bf16").fit()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(math.isfinite(h["loss"]) for h in result.history)
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    state = copy.deepcopy(trainer_state := result.history[-1])
    assert {"loss", "grad_norm", "lr", "tokens_per_s", "mem_peak_gb"} <= set(state)
    del trainer_state


def test_activation_checkpointing_gives_the_same_losses(tmp_path, story_dataset):
    from forgeline.config import PretrainConfig, validate_config
    from forgeline.recipes.setup import prepare_whole_model as prepare_model

    histories = []
    for checkpointing in (False, True):
        model = small_model(vocab=512)
        cfg = validate_config(PretrainConfig, {"data": {"dataset": str(story_dataset)},
                                               "train": {"activation_checkpointing": checkpointing}})
        wrapped = prepare_model(model, cfg, DistInfo())
        loader = PackedTokenLoader(story_dataset, seq_len=32, micro_batch_size=4, seed=0)
        result = make_trainer(wrapped, loader, tmp_path / str(checkpointing), max_steps=3).fit()
        histories.append([h["loss"] for h in result.history])
        # The wrapper keeps state-dict names unchanged, so checkpoints stay interchangeable.
        assert "layers.0.attention.wq.weight" in model.state_dict()
        assert (type(model.layers["0"]).__name__ == "CheckpointWrapper") == checkpointing
    assert histories[0] == pytest.approx(histories[1], abs=1e-6)


def test_metrics_and_tokens_are_reduced_over_the_whole_step(tmp_path):
    # two micro-batches with very different numbers of targets: a mean of micro-batch means would weigh the
    # 2-target batch like the 30-target one; the logged metric must be the mean over all 32 targets of the step
    torch.manual_seed(3)
    ids = torch.randint(0, 64, (2, 17))
    a_targets, b_targets = ids[:1, 1:].clone(), ids[1:, 1:].clone()
    a_targets[0, 2:] = -100  # 2 targets
    b_targets[0, 0] = -100  # 15 targets
    batches = [
        {"input_ids": ids[:1, :-1], "targets": a_targets, "n_targets": 2, "n_tokens": 16},
        {"input_ids": ids[1:, :-1], "targets": b_targets, "n_targets": 15, "n_tokens": 16},
    ]

    def with_metric(model, batch):
        out = causal_lm_loss(model, batch)
        kept = batch["targets"][batch["targets"] != -100]
        return dataclasses.replace(out, metrics={"target_id": float(kept.sum())})  # a sum over the units

    trainer = make_trainer(small_model(), ListLoader(batches), tmp_path, accum=2, loss_fn=with_metric, max_steps=1)
    result = trainer.fit()
    (record,) = [r for r in result.history if "loss" in r]
    every_target = torch.cat([a_targets[a_targets != -100], b_targets[b_targets != -100]]).float()
    assert record["target_id"] == pytest.approx(float(every_target.mean()))
    assert record["loss_units"] == 17 and record["step_tokens"] == 32  # loss over targets, speed over tokens
    assert result.tokens_seen == 32
