"""`forgeline sft`: supervised fine-tuning on instruction or chat data, loss on the assistant's tokens.

From a model (`init:`), a chat template (the model's own, or a built-in one) and records in the instruction,
chat-messages or ShareGPT format: each record is rendered by the template, tokenized with its loss mask, packed
several to a row (attention and positions kept per sample) or padded one to a row, and trained for `train.epochs`
passes with the causal LM loss on the masked tokens. The final model is saved with the template, and the template's
end-of-turn token is an end-of-sequence token of its generation config, so generation stops where a turn ends.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import SFTConfig
from ..data.chat_templates import load_chat_template
from ..data.packing import SFTLoader, TokenizedSample, best_fit_decreasing
from ..data.sft import SFTStats, load_sft_samples
from ..errors import ConfigError, DataError
from ..model import training_flops_per_token
from ..model.resize import resize_token_embeddings
from ..objectives import causal_lm_loss
from ..train.optim import resolve_schedule
from ..train.trainer import TrainResult
from .setup import Run, model_to_tune, run_stage
from .validation import loss_eval_fn


@dataclass
class SFTOutcome:
    result: TrainResult
    model_dir: Path | None  # None when a signal stopped the run (its checkpoint is written) or export=False
    train_stats: SFTStats


def sft(cfg: SFTConfig, *, resume: bool | str = False, export: bool = True) -> SFTOutcome:
    return run_stage(cfg, resume, lambda run: _sft(run, cfg, export), pipeline_ok=False, deepspeed_ok=False,
                     stage="sft")


def _sft(run: Run, cfg: SFTConfig, export: bool) -> SFTOutcome:
    model, tokenizer = model_to_tune(cfg, run.dist.device, "sft")

    # The template decides the tokens; special tokens it adds grow the vocabulary before anything is placed.
    vocab_before = tokenizer.vocab_size
    template = load_chat_template(tokenizer, cfg.data.template, add_special_tokens=cfg.data.add_special_tokens)
    if cfg.peft is not None and tokenizer.vocab_size > vocab_before:
        raise ConfigError(f"data.add_special_tokens added {tokenizer.vocab_size - vocab_before} token(s) for the "
                          f"{template.name} template, whose embeddings would have to train, but peft.method="
                          f"{cfg.peft.method} keeps the base frozen; use a template of tokens the model has "
                          "(data.template: model) or full fine-tuning")
    if tokenizer.vocab_size > model.cfg.vocab_size:
        resize_token_embeddings(model, int(math.ceil(tokenizer.vocab_size / 64) * 64))
    tokenizer.chat_template = template.source  # saved with the run's tokenizer, the checkpoints and the model
    if cfg.data.max_length > model.cfg.max_seq_len:
        if "max_length" in cfg.data.model_fields_set:
            raise ConfigError(f"data.max_length={cfg.data.max_length} is longer than the model's context "
                              f"(max_seq_len={model.cfg.max_seq_len}); set data.max_length<={model.cfg.max_seq_len}")
        # the default (4096) on a model with a shorter context: rows as long as the model can attend over
        cfg.data.max_length = model.cfg.max_seq_len
        run.print(f"data.max_length: {cfg.data.max_length} (the model's context)")
    data_args = dict(max_length=cfg.data.max_length, format=cfg.data.format, fields=cfg.data.fields,
                     system_prompt=cfg.data.system_prompt, instruction_style=cfg.data.instruction_style,
                     loss_on=cfg.data.loss_on, on_error=cfg.data.on_error)
    samples, stats = load_sft_samples(cfg.data.train, template, **data_args)
    val_samples: list[TokenizedSample] = []
    if cfg.data.validation:
        val_samples, _ = load_sft_samples(cfg.data.validation, template, **data_args)
    elif cfg.data.val_fraction > 0:
        samples, val_samples = split_validation(samples, cfg.data.val_fraction, cfg.seed)
    run.print(f"sft data: {stats.summary()}; template {template.name} (end of turn {template.end_of_turn!r}); "
              f"{len(val_samples)} validation samples")

    seq_len = cfg.data.max_length
    if run.layout.tp > 1 and cfg.data.packing and seq_len % run.layout.tp:
        raise ConfigError(f"data.max_length={seq_len} must be a multiple of parallel.tp={run.layout.tp} "
                          "(sequence parallelism splits each row)")
    accum = grad_accum_steps(cfg, samples, run.dp_size)
    run.place(model, tokenizer, grad_accum=accum)
    loader_args = dict(seq_len=seq_len, micro_batch_size=cfg.train.micro_batch_size, pad_id=pad_id(tokenizer),
                       packing=cfg.data.packing, seed=cfg.seed, rank=run.dp_rank, world_size=run.dp_size,
                       pad_to_multiple_of=run.layout.tp)
    loader = SFTLoader(samples, shuffle=cfg.data.shuffle, grad_accum_steps=accum, **loader_args)
    steps_per_epoch = loader.batches_per_epoch // accum
    train_cfg = resolve_schedule(cfg.train, steps_per_epoch)
    run.print(f"{len(samples):,} samples in {len(loader.rows):,} rows ({100 * loader.fill:.0f}% filled) | "
              f"{accum} accumulation step(s) x {run.dp_size} rank(s) x {cfg.train.micro_batch_size} rows of up to "
              f"{seq_len} tokens | {steps_per_epoch} steps per epoch, {train_cfg.max_steps} steps")
    val_loader = None
    if val_samples:
        val_loader = SFTLoader(val_samples, shuffle=False, eval_only=True, **loader_args)
    trainer = run.trainer(
        loss_fn=causal_lm_loss, loader=loader, train_cfg=train_cfg, grad_accum=accum,
        flops_per_token=training_flops_per_token(run.model.cfg, seq_len),
        eval_fn=loss_eval_fn(run, val_loader, causal_lm_loss) if val_loader else None,
    )
    result = trainer.fit(resume_from=run.resume_from)
    model_dir = run.finish(trainer, result, export=export, generation_eos=[template.end_of_turn])
    return SFTOutcome(result=result, model_dir=model_dir, train_stats=stats)


def grad_accum_steps(cfg: SFTConfig, samples: list[TokenizedSample], dp_size: int) -> int:
    """Accumulation steps for `train.global_batch_samples`. With packing a row holds several samples, so a step of
    N samples is N / (samples per row) rows, rounded to whole micro-batches (the step size printed at start)."""
    if cfg.train.global_batch_samples is None:
        return 1
    rows = len(best_fit_decreasing([len(s) for s in samples], cfg.data.max_length)) if cfg.data.packing \
        else len(samples)
    rows_per_step = cfg.train.global_batch_samples * rows / len(samples)
    return max(1, round(rows_per_step / (cfg.train.micro_batch_size * dp_size)))


def split_validation(samples: list[TokenizedSample], fraction: float, seed: int
                     ) -> tuple[list[TokenizedSample], list[TokenizedSample]]:
    """A seeded share of the samples held out (the same split on every rank and every resume)."""
    order = np.random.default_rng([seed, 0x5F7]).permutation(len(samples))
    n_val = max(1, int(round(fraction * len(samples))))
    if n_val >= len(samples):
        raise DataError(f"data.val_fraction={fraction} leaves no training samples out of {len(samples)}")
    held = set(order[:n_val].tolist())
    return ([s for i, s in enumerate(samples) if i not in held], [s for i, s in enumerate(samples) if i in held])


def pad_id(tokenizer) -> int:
    """Padding positions carry no target, so any id works; the tokenizer's pad (else EOS) keeps the rows readable."""
    return int(tokenizer.pad_id) if tokenizer.pad_id is not None else 0
