"""`forgeline pretrain`: next-token pre-training on token shards made by `forgeline data prepare`.

The tokenizer is the dataset's (or `tokenizer:`); the model is built from `model:` with the vocabulary filled from
the tokenizer, or continued from `init:`. Every optimizer step reads `train.global_batch_tokens` tokens of packed
documents (attention never crosses a document boundary); validation reports the loss, perplexity and bits per byte
of the held-out split.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from ..config import PretrainConfig
from ..data import PackedTokenLoader, check_tokenizer, load_index
from ..errors import ConfigError
from ..model import ModelConfig, Transformer, training_flops_per_token
from ..model.config import num_params
from ..model.inference.generate import sample
from ..objectives import causal_lm_loss
from ..tokenizer import Tokenizer
from ..train.optim import resolve_schedule
from ..train.trainer import TrainResult
from .setup import Run, initial_model, run_stage
from .validation import loss_eval_fn


@dataclass
class PretrainOutcome:
    result: TrainResult
    model_dir: Path | None  # None when a signal stopped the run before max_steps (its checkpoint is written)
    model: Transformer
    tokenizer: Tokenizer

    @property
    def preempted(self) -> bool:
        return self.result.preempted is not None


def pretrain(cfg: PretrainConfig, *, resume: bool | str = False) -> PretrainOutcome:
    """Pre-train as `cfg` says. resume: False (a fresh run; refused where checkpoints exist), True (continue from
    the newest intact checkpoint; an error when there is none) or "auto" (continue when possible, else start fresh;
    what a cluster job script wants). SIGTERM or SIGUSR1 stop the run after the current step with a checkpoint
    (`outcome.preempted`); no final model is written then."""
    if cfg.train.max_steps is None:
        raise ConfigError("train.max_steps: pre-training runs a number of steps (train.epochs is for stages with a "
                          "sample data set)")
    return run_stage(cfg, resume, lambda run: _pretrain(run, cfg), stage="pretrain")


def _pretrain(run: Run, cfg: PretrainConfig) -> PretrainOutcome:
    index = load_index(cfg.data.dataset)
    tokenizer = Tokenizer.load(cfg.tokenizer or Path(cfg.data.dataset) / "tokenizer")
    check_tokenizer(index, tokenizer)
    if cfg.init is None:
        cfg = cfg.model_copy(update={"model": resolve_model_config(cfg.model, tokenizer, cfg.data.seq_len)})
        run.cfg = cfg
    model, _ = initial_model(cfg, run.dist.device)
    if model.cfg.vocab_size < tokenizer.vocab_size or cfg.data.seq_len > model.cfg.max_seq_len:
        resolve_model_config(model.cfg, tokenizer, cfg.data.seq_len)  # the same checks, for an init model
    accum = grad_accum_steps(cfg, run.dp_size)
    run.place(model, tokenizer, grad_accum=accum)

    # The loader splits each global micro-batch over the data-parallel ranks only: the tensor-parallel and pipeline
    # ranks of one replica read the same batch. Epoch ends fall on whole optimizer steps, so B x A on one rank and
    # B*A x 1 see identical data across epochs.
    loader_args = dict(seq_len=cfg.data.seq_len, micro_batch_size=cfg.train.micro_batch_size, seed=cfg.seed,
                       rank=run.dp_rank, world_size=run.dp_size)
    train_loader = PackedTokenLoader(cfg.data.dataset, split="train", shuffle=cfg.data.shuffle,
                                     grad_accum_steps=accum, **loader_args)
    val_split = index["splits"].get("val", {})
    val_loader = validation_loader(cfg, run, val_split, loader_args)
    tokens_per_byte = val_split.get("tokens", 0) / max(1, val_split.get("bytes", 1))

    prompt_ids = (tokenizer.encode(cfg.monitor.sample_prompt, add_bos=True) if tokenizer.bos_id is not None
                  else tokenizer.encode(cfg.monitor.sample_prompt) or [tokenizer.eos_id])

    def sample_fn(m: Transformer) -> str:
        ids = sample(m, prompt_ids, max_new_tokens=48, temperature=0.8, top_k=50, seed=cfg.seed)
        return cfg.monitor.sample_prompt + tokenizer.decode(ids)

    trainer = run.trainer(
        loss_fn=causal_lm_loss, loader=train_loader, train_cfg=resolve_schedule(cfg.train, None), grad_accum=accum,
        flops_per_token=training_flops_per_token(model.cfg, cfg.data.seq_len),
        eval_fn=loss_eval_fn(run, val_loader, causal_lm_loss, tokens_per_byte=tokens_per_byte) if val_loader else None,
        sample_fn=sample_fn,
    )
    run.print(f"model {num_params(model.cfg):,} parameters | {accum} accumulation step(s) x {run.dp_size} "
              f"data-parallel rank(s) x {cfg.train.micro_batch_size} x {cfg.data.seq_len} tokens")
    result = trainer.fit(resume_from=run.resume_from)
    return PretrainOutcome(result=result, model_dir=run.finish(trainer, result), model=model, tokenizer=tokenizer)


def resolve_model_config(cfg: ModelConfig, tokenizer: Tokenizer, seq_len: int) -> ModelConfig:
    """Fill the vocabulary from the tokenizer (rounded up to a multiple of 64 for matmul-friendly shapes)."""
    if cfg.vocab_size is None:
        cfg = cfg.model_copy(update={"vocab_size": int(math.ceil(tokenizer.vocab_size / 64) * 64)})
    elif cfg.vocab_size < tokenizer.vocab_size:
        raise ConfigError(
            f"model.vocab_size={cfg.vocab_size} is smaller than the tokenizer's vocabulary ({tokenizer.vocab_size})"
        )
    if seq_len > cfg.max_seq_len:
        raise ConfigError(f"data.seq_len={seq_len} exceeds model.max_seq_len={cfg.max_seq_len}")
    return cfg


def grad_accum_steps(cfg: PretrainConfig, dp_size: int) -> int:
    per_micro = cfg.train.micro_batch_size * cfg.data.seq_len * dp_size
    if cfg.train.global_batch_samples is not None:
        raise ConfigError("train.global_batch_samples: pre-training batches are counted in tokens; set "
                          "train.global_batch_tokens")
    if cfg.train.global_batch_tokens is None:
        return 1
    if cfg.train.global_batch_tokens % per_micro:
        raise ConfigError(
            f"train.global_batch_tokens={cfg.train.global_batch_tokens} is not a multiple of micro_batch_size "
            f"({cfg.train.micro_batch_size}) x seq_len ({cfg.data.seq_len}) x ranks ({dp_size}) = {per_micro}"
        )
    return cfg.train.global_batch_tokens // per_micro


def validation_loader(cfg: PretrainConfig, run: Run, val_split: dict, loader_args: dict) -> PackedTokenLoader | None:
    """The held-out split, when it holds at least one batch per data-parallel rank (the pipeline splits each
    evaluation batch into its own micro-batches, so it needs whole micro-batches)."""
    tokens = val_split.get("tokens", 0)
    if run.pipeline_microbatches > 1:
        if tokens > cfg.data.seq_len * run.dp_size * cfg.train.micro_batch_size:
            return PackedTokenLoader(cfg.data.dataset, split="val", shuffle=False, **loader_args)
        return None
    if tokens > cfg.data.seq_len * run.dp_size:
        rows = min(cfg.train.micro_batch_size, max(1, (tokens - 1) // (cfg.data.seq_len * run.dp_size)))
        return PackedTokenLoader(cfg.data.dataset, split="val", shuffle=False,
                                 **dict(loader_args, micro_batch_size=rows))
    return None
