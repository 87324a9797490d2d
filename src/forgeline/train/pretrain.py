"""`forgeline pretrain`: next-token pre-training on token shards made by `forgeline data prepare`."""

from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import PretrainConfig, dump_config, read_yaml
from ..data import PackedTokenLoader, check_tokenizer, load_index
from ..errors import CheckpointError, ConfigError
from ..model import ModelConfig, Transformer, build_model, training_flops_per_token
from ..model.config import num_params as model_cfg_params
from ..model.generate import sample
from ..objectives import causal_lm_loss
from ..tokenizer import Tokenizer
from ..parallel.layout import resolve_layout
from .checkpoint import latest_checkpoint, list_checkpoints, print_stderr, select_checkpoint
from .distributed import DistInfo, all_reduce_sum, barrier, init_distributed, shutdown, unwrap
from ..model.pretrained import save_pretrained
from ..kernels import bf16_matmul
from .trainer import StepExecutor, Trainer, TrainResult


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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


def grad_accum_steps(cfg: PretrainConfig, world_size: int) -> int:
    per_micro = cfg.train.micro_batch_size * cfg.data.seq_len * world_size
    if cfg.train.global_batch_tokens is None:
        return 1
    if cfg.train.global_batch_tokens % per_micro:
        raise ConfigError(
            f"train.global_batch_tokens={cfg.train.global_batch_tokens} is not a multiple of micro_batch_size "
            f"({cfg.train.micro_batch_size}) x seq_len ({cfg.data.seq_len}) x ranks ({world_size}) = {per_micro}"
        )
    return cfg.train.global_batch_tokens // per_micro


def prepare_model(model: Transformer, cfg: PretrainConfig, dist: DistInfo) -> torch.nn.Module:
    """Activation checkpointing and compilation act per block (names in the state dict stay unchanged); DDP wraps
    the whole model when there are several ranks."""
    if cfg.train.activation_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

        for name in list(model.layers.keys()):
            model.layers[name] = checkpoint_wrapper(model.layers[name])
    if cfg.train.compile:
        for block in model.layers.values():
            block.compile()
    if dist.distributed:
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)
    return model


def make_eval_fn(cfg: PretrainConfig, val_loader: PackedTokenLoader | None, tokens_per_byte: float, dist: DistInfo,
                 executor: StepExecutor | None = None):
    if val_loader is None:
        return None
    executor = executor or StepExecutor(dist)

    @torch.no_grad()
    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        was_training = model.training
        model.eval()
        loss_sum = torch.zeros((), dtype=torch.float64)
        count = torch.zeros((), dtype=torch.float64)
        for batch in val_loader.iter_eval_batches(cfg.monitor.val_batches):
            loss = executor.evaluate(model, causal_lm_loss, batch, precision=cfg.train.precision, device=dist.device)
            if executor.reports_loss:
                loss_sum += loss
            if executor.counts_targets:
                count += int(batch["n_targets"])
        loss_sum, count = all_reduce_sum(loss_sum), all_reduce_sum(count)
        model.train(was_training)
        if count.item() == 0:
            return {}
        val_loss = float(loss_sum / count)
        # Bits per byte makes runs with different tokenizers comparable: nats/token -> bits/token -> bits/byte.
        return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0)),
                "val_bpb": val_loss / math.log(2) * tokens_per_byte}

    return evaluate


def check_resume_compatible(ckpt: Path, model_cfg: ModelConfig) -> None:
    if not (ckpt / "config.yaml").is_file():
        return
    saved = read_yaml(ckpt / "config.yaml").get("model", {})
    current = model_cfg.model_dump(mode="json")
    diffs = [k for k in current if k != "preset" and saved.get(k) != current[k]]
    if diffs:
        raise CheckpointError(
            f"{ckpt} was saved for another model shape ({', '.join(f'{k}: {saved.get(k)} -> {current[k]}' for k in diffs)});"
            " resume with the same model config or choose a new run_dir"
        )


def write_memory_report(run_dir: Path, cfg: PretrainConfig, dist: DistInfo, model, optimizer) -> None:
    """run_dir/memory.json: the planner's per-rank estimate (`forgeline plan memory`) beside the parameter and
    optimizer bytes every rank actually holds."""
    import json

    import torch.distributed as torch_dist

    from ..parallel.memory import estimate_memory, measure_state_bytes

    measured = [measure_state_bytes(model, optimizer)]
    if torch_dist.is_initialized() and dist.world_size > 1:
        gathered: list = [None] * dist.world_size
        torch_dist.all_gather_object(gathered, measured[0])
        measured = gathered
    if dist.is_main:
        report = {"estimate": estimate_memory(cfg, dist.world_size).as_dict(), "measured_per_rank": measured}
        (run_dir / "memory.json").write_text(json.dumps(report, indent=1))


@dataclass
class PretrainOutcome:
    result: TrainResult
    model_dir: Path  # where the final model is (not written when the run was preempted)
    model: Transformer
    tokenizer: Tokenizer

    @property
    def preempted(self) -> bool:
        """A signal stopped the run before max_steps: its last checkpoint is written, the final model is not."""
        return self.result.preempted is not None


def choose_resume_checkpoint(run_dir: Path, resume: bool | str, dist: DistInfo) -> Path | None:
    """The checkpoint `resume` asks for: None for a fresh start, else the newest intact one (rank 0 reports and
    renames damaged ones). resume=True with nothing to resume is an error; "auto" then starts fresh, saying so."""
    if resume not in (False, True, "auto"):
        raise ConfigError(f"resume={resume!r}: expected False, True or 'auto' (--resume / --resume=auto)")
    root = run_dir / "checkpoints"
    if not resume:
        if list_checkpoints(root):
            raise ConfigError(f"run_dir={run_dir} already holds checkpoints; pass --resume to continue it, "
                              "or choose another run_dir")
        return None
    report = print_stderr if dist.is_main else None
    found, damaged = select_checkpoint(root, dist, report=report)
    if found is not None:
        return found
    if damaged:
        what = (f"no intact checkpoint in {root} ({len(damaged)} damaged, renamed *.corrupt: "
                f"{'; '.join(damaged)})")
    else:
        what = f"run_dir={run_dir} has no checkpoint to resume from"
    if resume == "auto":
        if report:
            report(f"--resume=auto: {what}; starting a new run at step 0")
        return None
    if damaged:
        raise CheckpointError(f"--resume: {what}")
    raise ConfigError(f"--resume: {what}; start it without --resume, or use --resume=auto to resume only "
                      "when there is a checkpoint")


def check_parallel_config(cfg: PretrainConfig, world_size: int):
    """The layout against the world size and the model's shape, and what a layout rules out; before anything
    starts (no process group, no data, no model)."""
    layout = resolve_layout(cfg.parallel, world_size, cfg.model)
    whole_model = layout.is_plain_data_parallel and cfg.parallel.backend == "native"
    if not whole_model and cfg.monitor.sample_every:
        raise ConfigError(f"monitor.sample_every needs the whole model on every rank; the layout {layout.describe()} "
                          "splits it (unset monitor.sample_every, or sample from the exported model afterwards)")
    if cfg.parallel.backend == "deepspeed" and cfg.stability.max_rollbacks > 0:
        raise ConfigError("parallel.backend=deepspeed does not support the loss-spike rollback; set "
                          "stability.max_rollbacks=0 (non-finite steps are still skipped)")
    return layout


def pretrain(cfg: PretrainConfig, *, resume: bool | str = False) -> PretrainOutcome:
    """Pre-train as `cfg` says. resume: False (a fresh run; refused where checkpoints exist), True (continue from
    the newest intact checkpoint; an error when there is none) or "auto" (continue when possible, else start fresh;
    what a cluster job script wants). SIGTERM or SIGUSR1 stop the run after the current step with a checkpoint
    (`outcome.preempted`); no final model is written then."""
    check_parallel_config(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    dist = init_distributed(cfg.train.device)
    try:
        return _pretrain(cfg, dist, resume=resume)
    finally:
        shutdown()


def _pretrain(cfg: PretrainConfig, dist: DistInfo, *, resume: bool | str) -> PretrainOutcome:
    index = load_index(cfg.data.dataset)
    tokenizer = Tokenizer.load(cfg.tokenizer or Path(cfg.data.dataset) / "tokenizer")
    check_tokenizer(index, tokenizer)
    model_cfg = resolve_model_config(cfg.model, tokenizer, cfg.data.seq_len)
    cfg = cfg.model_copy(update={"model": model_cfg})
    layout = check_parallel_config(cfg, dist.world_size)
    whole_model = layout.is_plain_data_parallel and cfg.parallel.backend == "native"
    dp_rank, dp_size = layout.dp_rank(dist.rank), layout.dp
    accum = grad_accum_steps(cfg, dp_size)
    run_dir = Path(cfg.run_dir)
    resume_from = choose_resume_checkpoint(run_dir, resume, dist)
    if resume_from is not None:
        check_resume_compatible(resume_from, model_cfg)

    # auto keeps bf16 GEMMs under torch.compile and activation checkpointing, which do not see the function mode that
    # moves them to the fp32 units (the recomputed forward would take the other path)
    bf16_mode = cfg.train.bf16_matmul
    if bf16_mode == "auto" and (cfg.train.compile or cfg.train.activation_checkpointing):
        bf16_mode = "native"
    bf16_matmul.configure(bf16_mode)

    seed_everything(cfg.seed)
    # Every rank builds the whole model from the same seed (so any layout starts from the single-process weights),
    # then the layout keeps and shards its part.
    model = build_model(model_cfg, device=dist.device)
    executor = checkpointer = optimizer = None
    n_pipeline_micro = 1
    if whole_model:
        wrapped = prepare_model(model, cfg, dist)
    elif cfg.parallel.backend == "deepspeed":
        from ..parallel.deepspeed import deepspeed_setup

        ds = deepspeed_setup(model, cfg, dist, grad_accum_steps=accum)
        wrapped, executor, checkpointer, optimizer = ds.engine, ds.executor, ds.checkpointer, ds.optimizer
    else:
        from ..parallel.apply import parallelize
        from ..parallel.checkpoint import ShardedCheckpointer

        par = parallelize(model, cfg, layout, dist)
        wrapped, executor = par.model, par.executor
        checkpointer = ShardedCheckpointer(layout.describe())
        n_pipeline_micro = getattr(executor, "n_microbatches", 1)
    if dist.is_main and not whole_model:
        print(f"parallel layout: {layout.describe()}", flush=True)
    # The data loader splits each global micro-batch over the data-parallel ranks only: the tensor-parallel and
    # pipeline ranks of one replica read the same batch.
    loader_args = dict(seq_len=cfg.data.seq_len, micro_batch_size=cfg.train.micro_batch_size, seed=cfg.seed,
                       rank=dp_rank, world_size=dp_size)
    # Epoch ends fall on whole optimizer steps, so B x A on one rank and B*A x 1 see identical data across epochs.
    train_loader = PackedTokenLoader(cfg.data.dataset, split="train", shuffle=cfg.data.shuffle,
                                     grad_accum_steps=accum, **loader_args)
    val_split = index["splits"].get("val", {})
    val_loader = None
    if n_pipeline_micro > 1:  # the pipeline splits evaluation batches into its micro-batches too
        if val_split.get("tokens", 0) > cfg.data.seq_len * dp_size * cfg.train.micro_batch_size:
            val_loader = PackedTokenLoader(cfg.data.dataset, split="val", shuffle=False, **loader_args)
    elif val_split.get("tokens", 0) > cfg.data.seq_len * dp_size:
        val_loader = PackedTokenLoader(cfg.data.dataset, split="val", shuffle=False, **dict(
            loader_args, micro_batch_size=min(cfg.train.micro_batch_size,
                                              max(1, (val_split["tokens"] - 1) // (cfg.data.seq_len * dp_size)))))
    tokens_per_byte = val_split.get("tokens", 0) / max(1, val_split.get("bytes", 1))

    config_yaml = dump_config(cfg)
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(config_yaml)

    prompt_ids = tokenizer.encode(cfg.monitor.sample_prompt, add_bos=True) if tokenizer.bos_id is not None else (
        tokenizer.encode(cfg.monitor.sample_prompt) or [tokenizer.eos_id])

    def sample_fn(m: Transformer) -> str:
        ids = sample(m, prompt_ids, max_new_tokens=48, temperature=0.8, top_k=50, seed=cfg.seed)
        return cfg.monitor.sample_prompt + tokenizer.decode(ids)

    trainer = Trainer(
        model=wrapped, loss_fn=causal_lm_loss, train_loader=train_loader, train=cfg.train,
        checkpoint=cfg.checkpoint, stability=cfg.stability, monitor=cfg.monitor, run_dir=run_dir,
        config_yaml=config_yaml, dist=dist, grad_accum_steps=accum,
        flops_per_token=training_flops_per_token(model_cfg, cfg.data.seq_len),
        eval_fn=make_eval_fn(cfg, val_loader, tokens_per_byte, dist, executor),
        sample_fn=sample_fn if whole_model else None, executor=executor, checkpointer=checkpointer,
        optimizer=optimizer,
    )
    if dist.is_main:
        trainer_note = (f"model {model_cfg_params(model_cfg):,} parameters | {accum} accumulation step(s) x "
                        f"{dp_size} data-parallel rank(s) x {cfg.train.micro_batch_size} x {cfg.data.seq_len} tokens")
        print(trainer_note, flush=True)
    result = trainer.fit(resume_from=resume_from)
    model_dir = run_dir / "model"
    if result.preempted is not None:
        if dist.is_main:
            print_stderr(f"preempted by {result.preempted} at step {result.steps}; checkpoint written to "
                         f"{result.checkpoint}; continue with --resume=auto")
        return PretrainOutcome(result=result, model_dir=model_dir, model=model, tokenizer=tokenizer)
    if cfg.parallel.backend == "native":
        write_memory_report(run_dir, cfg, dist, unwrap(wrapped), trainer.optimizer)
    if whole_model:
        if dist.is_main:
            save_pretrained(unwrap(wrapped), tokenizer, model_dir)
    else:
        # Sharded layouts: the final checkpoint (always written at max_steps) is consolidated into one model.
        from ..parallel.checkpoint import consolidate

        barrier()
        if dist.is_main:
            consolidate(latest_checkpoint(run_dir / "checkpoints"), model_dir,
                        tokenizer_dir=cfg.tokenizer or Path(cfg.data.dataset) / "tokenizer", overwrite=True)
        barrier()
    return PretrainOutcome(result=result, model_dir=model_dir, model=model, tokenizer=tokenizer)
