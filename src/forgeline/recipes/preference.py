"""What the preference stages (rm, dpo, orpo, kto) share: the starting model and its chat template, the data split
into train and held-out items, their loaders, the reference model's log-probs, and the loop.

A stage module says only what is its own (the objective, the model's head, the export):

    def _dpo(run, cfg):
        model, tokenizer, template = starting_model(run, cfg)
        data = load_split(run, cfg, template, kind="pairs")
        loaders = place_and_load(run, cfg, model, tokenizer, data, pad_id)
        objective = DPOObjective(..., reference=reference_for(run, cfg, cfg.dpo, loaders))
        return train(run, cfg, objective, loaders, data, template)

The reference. With adapters on a frozen base, the base with its adapters switched off is the reference: no
second copy of the model, nothing to cache. Otherwise the reference's log-probs are computed once before the first
step, over the training and held-out pairs, and kept in `run_dir/reference_logps.safetensors` with a fingerprint
of the data and the reference; a resumed run reads them back (its policy is no longer the reference). Before the
first step the policy *is* the reference (when `reference_model` is not set), so it computes them itself; only a
resumed run without the file, or another reference model, loads one (`Run.frozen`), and frees it afterwards.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import PreferenceStageConfig, ReferenceSettings
from ..data.chat_templates import ChatTemplate, load_chat_template
from ..data.preference import PreferenceStats, load_preference_data
from ..data.preference_batches import (PreferenceLoader, collate_branched_pairs, collate_pairs, collate_unpaired,
                                      kl_partners)
from ..errors import DataError
from ..files import atomic_write_bytes
from ..model import training_flops_per_token
from ..objectives.preference import FrozenReference, Reference, adapters_off_reference, cached_reference
from ..objectives.preference import response_logps
from ..train.distributed import reshard_fsdp, unwrap
from ..train.executor import autocast_context, to_device
from ..train.optim import resolve_schedule
from ..train.trainer import TrainResult
from .setup import Run, model_to_tune
from .sft import split_validation
from .validation import objective_eval_fn

REFERENCE_FILE = "reference_logps.safetensors"


@dataclass
class PreferenceData:
    train: list[Any]
    validation: list[Any]
    stats: PreferenceStats
    kind: str  # "pairs" or "unpaired"


@dataclass
class Loaders:
    train: PreferenceLoader
    validation: PreferenceLoader | None
    accum: int

    def all(self) -> list[PreferenceLoader]:
        return [self.train] + ([self.validation] if self.validation is not None else [])


@dataclass
class PreferenceOutcome:
    result: TrainResult
    model_dir: Path | None  # None when a signal stopped the run (its checkpoint is written) or export=False
    data_stats: PreferenceStats


def starting_model(run: Run, cfg: PreferenceStageConfig, stage: str):
    """`init` loaded (fp32 master weights) with its tokenizer and the chat template the data is rendered with."""
    model, tokenizer = model_to_tune(cfg, run.dist.device, stage)
    template = load_chat_template(tokenizer, cfg.data.template)
    tokenizer.chat_template = template.source  # saved with the run's tokenizer, the checkpoints and the model
    return model, tokenizer, template


def load_split(run: Run, cfg: PreferenceStageConfig, template: ChatTemplate, *, kind: str) -> PreferenceData:
    """The training items and the held-out ones (data.validation, else a seeded data.val_fraction of train)."""
    args = dict(max_length=cfg.data.max_length, max_prompt_length=cfg.data.max_prompt_length,
                format=cfg.data.format, fields=cfg.data.fields, system_prompt=cfg.data.system_prompt,
                on_error=cfg.data.on_error, kind=kind)
    items, stats = load_preference_data(cfg.data.train, template, **args)
    held: list[Any] = []
    if cfg.data.validation:
        held, _ = load_preference_data(cfg.data.validation, template, **args)
    elif cfg.data.val_fraction > 0:
        items, held = split_validation(items, cfg.data.val_fraction, cfg.seed)
    run.print(f"preference data: {stats.summary()}; template {template.name}; {len(items):,} for training, "
              f"{len(held):,} held out")
    return PreferenceData(train=items, validation=held, stats=stats, kind=kind)


def place_and_load(run: Run, cfg: PreferenceStageConfig, model, tokenizer, data: PreferenceData, pad_id: int,
                   *, branched: bool = False) -> Loaders:
    """The model laid out over the ranks (adapters first), and the loaders of its data-parallel rank.
    `train.global_batch_samples` counts pairs (examples for KTO) per optimizer step. branched: one row per pair
    with the prompt once (data.preference_batches.collate_branched_pairs; a reward model's), where the layout
    allows it (not under tensor parallelism, whose sequence shards need rows padded to a multiple)."""
    micro = cfg.train.micro_batch_size
    accum = 1
    if cfg.train.global_batch_samples is not None:
        accum = max(1, round(cfg.train.global_batch_samples / (micro * run.dp_size)))
    run.place(model, tokenizer, grad_accum=accum)
    collate = _collator(cfg, data, pad_id, run.layout.tp, branched and run.layout.tp == 1)
    common = dict(micro_batch_size=micro, seed=cfg.seed, rank=run.dp_rank, world_size=run.dp_size,
                  what="pairs" if data.kind == "pairs" else "examples")
    train = PreferenceLoader(data.train, collate(data.train), shuffle=cfg.data.shuffle, grad_accum_steps=accum,
                             **common)
    val = (PreferenceLoader(data.validation, collate(data.validation), shuffle=False, eval_only=True, **common)
           if data.validation else None)
    return Loaders(train=train, validation=val, accum=accum)


def _collator(cfg: PreferenceStageConfig, data: PreferenceData, pad_id: int, multiple: int, branched: bool):
    if data.kind == "pairs":
        if branched:
            def for_branched(items):
                return lambda batch, **kw: collate_branched_pairs(batch, pad_id, **kw)
            return for_branched

        def for_items(items):
            return lambda batch, **kw: collate_pairs(batch, pad_id, pad_to_multiple_of=multiple, **kw)
        return for_items

    def for_unpaired(items):
        partner = kl_partners(len(items), cfg.seed)
        position = {id(item): i for i, item in enumerate(items)}

        def collate(batch, **kw):
            partners = [items[partner[position[id(e)]]] for e in batch]
            return collate_unpaired(batch, partners, pad_id, max_length=cfg.data.max_length,
                                    pad_to_multiple_of=multiple, **kw)
        return collate
    return for_unpaired


# -- the reference -------------------------------------------------------------------------------------------------


def reference_for(run: Run, cfg: PreferenceStageConfig, settings: ReferenceSettings, loaders: Loaders
                  ) -> Reference:
    """How the stage gets the reference's log-probs (see the module doc); prints the choice."""
    mode = settings.reference
    base_is_reference = cfg.peft is not None and settings.reference_model is None
    if mode == "auto":
        mode = "online" if base_is_reference else "cached"
    if mode == "online":
        if base_is_reference:
            run.print("reference: the base model with the adapters switched off (no second copy)")
            return adapters_off_reference
        source = settings.reference_model or cfg.init
        run.print(f"reference: {source}, a frozen copy evaluated every step")
        return FrozenReference(run.frozen(source))
    cache_reference_logps(run, cfg, settings, loaders)
    return cached_reference


def _fingerprint(run: Run, cfg: PreferenceStageConfig, settings: ReferenceSettings, loaders: Loaders) -> str:
    digest = hashlib.sha256()
    source = settings.reference_model or cfg.init
    digest.update(f"{source}|{cfg.train.precision}|{cfg.peft.method if cfg.peft else 'full'}|".encode())
    for loader in loaders.all():
        digest.update(f"{len(loader.items)};".encode())
        for item in loader.items:
            for sample in ((item.chosen, item.rejected) if hasattr(item, "chosen") else (item.sample,)):
                digest.update(sample.input_ids.tobytes())
                digest.update(np.packbits(sample.loss_mask).tobytes())
    return digest.hexdigest()


def cache_reference_logps(run: Run, cfg: PreferenceStageConfig, settings: ReferenceSettings,
                          loaders: Loaders) -> None:
    """Every loader's `reference`: read from run_dir when its fingerprint matches, else computed and written."""
    from safetensors.numpy import load, save

    path = run.run_dir / REFERENCE_FILE
    fingerprint = _fingerprint(run, cfg, settings, loaders)
    names = ["train", "validation"][:len(loaders.all())]
    if path.is_file():
        stored = load(path.read_bytes())
        meta = _metadata(path)
        if meta.get("fingerprint") == fingerprint and all(n in stored for n in names):
            for name, loader in zip(names, loaders.all()):
                loader.reference = stored[name]
            run.print(f"reference: log-probs read from {path}")
            return
        if run.resume_from is None:
            run.print(f"reference: {path} belongs to other data or another reference; computing them again")
    if cfg.peft is not None and settings.reference_model is None:
        model, what = run.wrapped, "the base (adapters off)"
    elif run.resume_from is None and settings.reference_model is None:
        model, what = run.wrapped, "the starting policy"
    else:
        model, what = run.frozen(settings.reference_model or cfg.init), str(settings.reference_model or cfg.init)
    arrays = {name: _logps_over(run, model, loader, adapters_off=cfg.peft is not None)
              for name, loader in zip(names, loaders.all())}
    for name, loader in zip(names, loaders.all()):
        loader.reference = arrays[name]
    if run.dist.is_main:
        atomic_write_bytes(path, save(arrays, metadata={"fingerprint": fingerprint, "reference": what}))
    run.print(f"reference: log-probs of {sum(len(a) for a in arrays.values()):,} items computed once with {what}, "
              f"kept in {path}")


def _metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        return f.metadata() or {}


@torch.no_grad()
def _logps_over(run: Run, model, loader: PreferenceLoader, *, adapters_off: bool) -> np.ndarray:
    """(items, 2) reference log-probs (chosen/rejected, or completion/KL row), each rank its share, then gathered."""
    import contextlib

    import torch.distributed as torch_dist

    from ..peft.apply import adapters_disabled

    was_training = model.training
    model.eval()
    found: dict[int, tuple[float, float]] = {}
    switch = adapters_disabled(unwrap(model)) if adapters_off else contextlib.nullcontext()
    with switch:
        for batch in loader.iter_eval_batches():
            batch = to_device(batch, run.dist.device)
            with autocast_context(run.dist.device, run.cfg.train.precision):
                logps = response_logps(model, batch["input_ids"], batch["targets"])[0].float().cpu()
            B = batch["index"].shape[0]
            for row, index in enumerate(batch["index"].tolist()):
                if index >= 0:
                    found[index] = (float(logps[row]), float(logps[B + row]))
    model.train(was_training)
    reshard_fsdp(model)
    if run.dist.world_size > 1 and torch_dist.is_initialized():
        gathered: list = [None] * run.dist.world_size
        torch_dist.all_gather_object(gathered, found)
        found = {k: v for part in gathered for k, v in part.items()}
    if len(found) != len(loader.items):
        raise DataError(f"reference log-probs cover {len(found)} of {len(loader.items)} items")
    return np.array([found[i] for i in range(len(loader.items))], dtype=np.float32)


# -- the loop --------------------------------------------------------------------------------------------------


def train(run: Run, cfg: PreferenceStageConfig, objective, loaders: Loaders, *, export: bool,
          generation_eos: list[str] | None, extra_forward: bool = False) -> tuple[TrainResult, Path | None]:
    """The one loop on the stage's objective; `extra_forward`: a reference forward pass every step (counted in
    MFU)."""
    steps_per_epoch = loaders.train.batches_per_epoch // loaders.accum
    train_cfg = resolve_schedule(cfg.train, steps_per_epoch)
    run.print(f"{len(loaders.train):,} {loaders.train.what} | {loaders.accum} accumulation step(s) x "
              f"{run.dp_size} rank(s) x {cfg.train.micro_batch_size} per micro-batch | {steps_per_epoch} steps per "
              f"epoch, {train_cfg.max_steps} steps")
    flops = training_flops_per_token(run.model.cfg, cfg.data.max_length)
    if extra_forward:
        flops *= 4 / 3  # a forward is a third of forward + backward
    trainer = run.trainer(loss_fn=objective, loader=loaders.train, train_cfg=train_cfg, grad_accum=loaders.accum,
                          flops_per_token=flops,
                          eval_fn=objective_eval_fn(run, loaders.validation, objective) if loaders.validation
                          else None)
    result = trainer.fit(resume_from=run.resume_from)
    return result, run.finish(trainer, result, export=export, generation_eos=generation_eos)


def pad_id(tokenizer) -> int:
    """The tokenizer's pad (else its end-of-sequence) token: what a reward model's pooling skips."""
    for value in (tokenizer.pad_id, getattr(tokenizer, "eos_id", None)):
        if value is not None:
            return int(value)
    return 0

