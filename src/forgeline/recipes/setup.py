"""The run set-up every training stage shares, so that a recipe only says what is particular to its stage.

    def sft(cfg, *, resume=False):
        return run_stage(cfg, resume, lambda run: _sft(run, cfg))

    def _sft(run, cfg):
        model, tokenizer = initial_model(run)              # cfg.init loaded, or cfg.model built from the seed
        ...the stage's data...
        run.place(model, tokenizer)                       # the layout: one process, DDP, FSDP2/TP/PP, DeepSpeed
        trainer = run.trainer(loss_fn=..., loader=..., train_cfg=..., grad_accum=...)
        result = trainer.fit(resume_from=run.resume_from)
        return run.finish(trainer, result)                # the final model directory

`run_stage` checks the layout before any process group exists, initialises torch.distributed, picks the checkpoint
to resume from (passing over damaged ones), and shuts down whatever happens. `Run.place` applies the layout in one
place for every stage; `Run.frozen` places a model that is only evaluated (a reference or reward model): under the
same layout, in eval mode, with no gradients, outside the optimizer and the checkpoints.
"""

from __future__ import annotations

import json
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

import numpy as np
import torch
from torch import nn

from ..config import StageConfig, TrainConfig, dump_config, read_yaml
from ..errors import CheckpointError, ConfigError
from ..files import atomic_write_text
from ..model import Transformer, build_model
from ..model.formats import load_model
from ..model.formats.model_dir import save_model_dir
from ..parallel.layout import Layout, resolve_layout
from ..tokenizer import Tokenizer
from ..kernels import bf16_matmul
from ..model.formats.checkpoint import RUN_TOKENIZER_DIR, latest_checkpoint, list_checkpoints, print_stderr
from ..train.checkpoint import select_checkpoint
from ..train.cpu_allocator import keep_large_blocks
from ..train.distributed import DistInfo, barrier, init_distributed, shutdown, unwrap
from ..train.executor import StepExecutor
from ..train.trainer import Trainer, TrainResult
from .benchmarks import benchmark_evals, check_benchmark_config

T = TypeVar("T")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def check_parallel_config(cfg: StageConfig, world_size: int, *, pipeline_ok: bool = True,
                          deepspeed_ok: bool = True, stage: str = "this stage") -> Layout:
    """The layout against the world size and (when the model is built here) its shape, and what a layout rules
    out; before anything starts (no process group, no data, no model). With `init`, the model's shape is checked
    again once it is loaded."""
    layout = resolve_layout(cfg.parallel, world_size, None if cfg.init else cfg.model)
    whole_model = layout.is_plain_data_parallel and cfg.parallel.backend == "native"
    if not whole_model and cfg.monitor.sample_every:
        raise ConfigError(f"monitor.sample_every needs the whole model on every rank; the layout {layout.describe()} "
                          "splits it (unset monitor.sample_every, or sample from the exported model afterwards)")
    if cfg.parallel.backend == "deepspeed":
        if not deepspeed_ok:
            raise ConfigError(f"parallel.backend=deepspeed is not supported for {stage}; use the native backend "
                              "(parallel.dp_shard=-1 is FSDP2, the same ZeRO-3 sharding)")
        if cfg.stability.max_rollbacks > 0:
            raise ConfigError("parallel.backend=deepspeed does not support the loss-spike rollback; set "
                              "stability.max_rollbacks=0 (non-finite steps are still skipped)")
    if cfg.peft is not None and (layout.tp > 1 or layout.pp > 1 or cfg.parallel.backend == "deepspeed"):
        raise ConfigError(f"peft.method={cfg.peft.method} runs under DDP and FSDP2 (parallel.dp_shard), not under "
                          f"{layout.describe()}{' with parallel.backend=deepspeed' if cfg.parallel.backend == 'deepspeed' else ''}: "
                          "tensor and pipeline layouts would shard the base and its adapters apart; adapters are small "
                          "enough that data parallelism is the layout to use")
    if layout.pp > 1 and not pipeline_ok:
        raise ConfigError(f"parallel.pp={layout.pp}: pipeline parallelism runs fixed-shape pre-training batches "
                          f"only, not {stage}'s variable-length ones; use FSDP2 (parallel.dp_shard=-1) and/or "
                          "tensor parallelism (parallel.tp) instead")
    check_benchmark_config(cfg, layout)
    return layout


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


def check_resume_compatible(ckpt: Path, model_cfg) -> None:
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


def initial_model(cfg: StageConfig, device: torch.device) -> tuple[Transformer, Tokenizer | None]:
    """The model a stage starts from: `init` loaded in fp32 (the master weights the optimizer updates) with its
    tokenizer, or a new `model:` built from the seed (every rank builds the same weights, so any layout starts from
    the single-process model)."""
    seed_everything(cfg.seed)
    if cfg.init is None:
        if cfg.model.vocab_size is None:
            raise ConfigError("model.vocab_size is not set (a new model needs it, or set init: to start from one)")
        return build_model(cfg.model, device=device), None
    loaded = load_model(cfg.init, dtype=torch.float32, device=device)
    model = loaded.model
    model.train()
    model.requires_grad_(True)
    return model, loaded.tokenizer


def model_to_tune(cfg: StageConfig, device: torch.device, stage: str) -> tuple[Transformer, Tokenizer]:
    """What a fine-tuning stage (sft, rm, dpo, ...) starts from: `init` loaded as `initial_model` loads it, with
    its tokenizer (or `tokenizer:`, which wins); both are required."""
    if cfg.init is None:
        raise ConfigError(f"{stage} needs init: the model to start from (a run, checkpoint or model dir, a Hugging "
                          "Face dir or a .gguf file)")
    model, tokenizer = initial_model(cfg, device)
    if cfg.tokenizer is not None:
        tokenizer = Tokenizer.load(cfg.tokenizer)
    if tokenizer is None:
        raise ConfigError(f"init={cfg.init} has no tokenizer beside it; set tokenizer: to its directory")
    return model, tokenizer


def prepare_whole_model(model: Transformer, cfg: StageConfig, dist: DistInfo) -> nn.Module:
    """Activation checkpointing and compilation act per block (names in the state dict stay unchanged); DDP wraps
    the whole model when there are several ranks."""
    if cfg.train.activation_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

        for name in list(model.layers.keys()):
            model.layers[name] = checkpoint_wrapper(model.layers[name])
    if cfg.train.compile:
        for block in model.layers.values():
            block.compile()
    if dist.distributed and any(p.requires_grad for p in model.parameters()):
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)
    return model


@dataclass
class Run:
    """One stage's process: its config, ranks and layout, and once placed, the model the loop trains."""

    cfg: StageConfig
    dist: DistInfo
    layout: Layout
    resume_from: Path | None = None
    model: Transformer | None = None  # the trained model, unwrapped
    wrapped: nn.Module | None = None  # what the loop calls: the model under DDP / FSDP2 / pipeline / DeepSpeed
    tokenizer: Tokenizer | None = None
    executor: StepExecutor | None = None
    checkpointer: Any = None
    optimizer: torch.optim.Optimizer | None = None
    peft: Any = None  # forgeline.peft.apply.PeftReport once adapters are applied (cfg.peft)

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.run_dir)

    @property
    def whole_model(self) -> bool:
        return self.layout.is_plain_data_parallel and self.cfg.parallel.backend == "native"

    @property
    def dp_rank(self) -> int:
        return self.layout.dp_rank(self.dist.rank)

    @property
    def dp_size(self) -> int:
        return self.layout.dp

    @property
    def pipeline_microbatches(self) -> int:
        return getattr(self.executor, "n_microbatches", 1)

    def print(self, message: str) -> None:
        if self.dist.is_main:
            print(message, flush=True)

    # -- placing models ------------------------------------------------------------------------------------------

    def place(self, model: Transformer, tokenizer: Tokenizer, *, grad_accum: int = 1) -> None:
        """Lay the trained model out over the ranks; record the resolved config and the run's tokenizer."""
        cfg = self.cfg = self.cfg.model_copy(update={"model": model.cfg})
        if cfg.init is not None:  # the shape only known now: check it against the layout as the builder would
            resolve_layout(cfg.parallel, self.dist.world_size, model.cfg)
        if self.resume_from is not None:
            check_resume_compatible(self.resume_from, model.cfg)
        if cfg.peft is not None:
            self.apply_adapters(model)
        # auto keeps bf16 GEMMs under torch.compile and activation checkpointing, which do not see the function
        # mode that moves them to the fp32 units (the recomputed forward would take the other path)
        bf16_mode = cfg.train.bf16_matmul
        if bf16_mode == "auto" and (cfg.train.compile or cfg.train.activation_checkpointing):
            bf16_mode = "native"
        bf16_matmul.configure(bf16_mode)
        if self.dist.device.type == "cpu":
            keep_large_blocks()
        self.model, self.tokenizer = model, tokenizer
        if self.whole_model:
            from ..parallel.checkpoint import WholeModelCheckpointer

            self.wrapped = prepare_whole_model(model, cfg, self.dist)
            self.checkpointer = WholeModelCheckpointer()
        elif cfg.parallel.backend == "deepspeed":
            from ..parallel.deepspeed import deepspeed_setup

            ds = deepspeed_setup(model, cfg, self.dist, grad_accum_steps=grad_accum)
            self.wrapped, self.executor, self.checkpointer, self.optimizer = (ds.engine, ds.executor,
                                                                               ds.checkpointer, ds.optimizer)
        else:
            from ..parallel.apply import parallelize
            from ..parallel.checkpoint import ShardedCheckpointer

            par = parallelize(model, cfg, self.layout, self.dist)
            self.wrapped, self.executor = par.model, par.executor
            self.checkpointer = ShardedCheckpointer(self.layout.describe())
            self.print(f"parallel layout: {self.layout.describe()}")
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            tokenizer.save(self.run_dir / RUN_TOKENIZER_DIR)
        barrier()

    def apply_adapters(self, model: Transformer) -> None:
        """The adapter step (cfg.peft): freeze the base, add the adapters; a resumed run's checkpoint must have been
        trained on this same base (its hash), checked here, before any step runs."""
        from ..peft.apply import apply_peft, base_fingerprint, check_base

        fingerprint = base_fingerprint(model)
        if self.resume_from is not None:
            saved = _read_json(self.resume_from / "trainer_state.json").get("base")
            if saved is None:
                raise CheckpointError(f"{self.resume_from} holds a full model, not adapters trained with peft: "
                                      f"{self.cfg.peft.method}; resume it without peft:, or start a new run_dir")
            check_base(saved["sha256"], fingerprint, what=str(self.resume_from), base=self.cfg.init)
        self.peft = apply_peft(model, self.cfg.peft, precision=self.cfg.train.precision, fingerprint=fingerprint)
        head = getattr(model, "score", None)
        if head is not None:  # a new head (a reward model's) trains beside the adapters: PEFT's modules_to_save
            head.requires_grad_(True)
            self.peft.trainable_params += sum(p.numel() for p in head.parameters())
        self.print(self.peft.describe())

    def base_reference(self):
        from ..peft.apply import BaseReference

        return BaseReference(path=str(self.cfg.init), sha256=self.peft.base_sha256, method=self.cfg.peft.method,
                             peft=self.cfg.peft.model_dump(mode="json"))

    def frozen(self, source: str | Path) -> nn.Module:
        """A model that is only evaluated (a reference or reward model), placed beside the trained one: its own
        copy on every rank for whole-model layouts, sharded like the trained model under FSDP2; in eval mode, with
        no gradients, and never in the optimizer or the checkpoints."""
        if not self.whole_model and (self.layout.tp > 1 or self.layout.pp > 1 or
                                     self.cfg.parallel.backend == "deepspeed"):
            raise ConfigError(f"a frozen model under the layout {self.layout.describe()} is not supported; use DDP "
                              "or FSDP2 (parallel.dp_shard)")
        loaded = load_model(source, dtype=torch.float32, device=self.dist.device)
        model = loaded.model.eval().requires_grad_(False)
        if not self.whole_model:
            from torch.distributed.fsdp import fully_shard

            from ..parallel.apply import build_mesh, dp_mesh

            mesh = dp_mesh(build_mesh(self.layout, self.dist.device), self.layout)
            for block in model.layers.values():
                fully_shard(block, mesh=mesh)
            fully_shard(model, mesh=mesh)
        return model

    # -- the loop ------------------------------------------------------------------------------------------------

    def trainer(self, *, loss_fn, loader, train_cfg: TrainConfig, grad_accum: int, flops_per_token: float | None,
                eval_fn=None, sample_fn=None) -> Trainer:
        """The loop on the placed model; `train_cfg` has its step counts resolved (resolve_schedule), and the fully
        resolved config is what run_dir/config.yaml and every checkpoint record. `eval_fn` is the held-out loss
        (every monitor.val_every steps); the benchmarks of `eval:` run on their own cadence (recipes/benchmarks.py)."""
        self.cfg = self.cfg.model_copy(update={"train": train_cfg})
        benchmarks = benchmark_evals(self)
        config_yaml = dump_config(self.cfg)
        if self.dist.is_main:
            atomic_write_text(self.run_dir / "config.yaml", config_yaml)
        trainer = Trainer(
            model=self.wrapped, loss_fn=loss_fn, train_loader=loader, train=train_cfg, checkpoint=self.cfg.checkpoint,
            stability=self.cfg.stability, monitor=self.cfg.monitor, run_dir=self.run_dir,
            config_yaml=config_yaml, dist=self.dist,
            grad_accum_steps=grad_accum, flops_per_token=flops_per_token, eval_fn=eval_fn,
            periodic_evals=benchmarks,
            sample_fn=sample_fn if self.whole_model else None, executor=self.executor,
            checkpointer=self.checkpointer, optimizer=self.optimizer,
        )
        if self.peft is not None:
            ref = self.base_reference()
            trainer.extra_state["base"] = {"path": ref.path, "sha256": ref.sha256, "method": ref.method}
        return trainer

    def finish(self, trainer: Trainer, result: TrainResult, *, export: bool = True,
               generation_eos: list[str] | None = None) -> Path | None:
        """After `fit`: the memory report and the final model directory (None when a signal stopped the run: its
        checkpoint is written, `--resume=auto` continues it)."""
        if result.preempted is not None:
            if self.dist.is_main:
                print(f"preempted by {result.preempted} at step {result.steps}; checkpoint written to "
                      f"{result.checkpoint}; continue with --resume=auto", file=sys.stderr, flush=True)
            return None
        if self.cfg.parallel.backend == "native":
            write_memory_report(self.run_dir, self.cfg, self.dist, unwrap(self.wrapped), trainer.optimizer)
        if not export:
            return None
        if self.peft is not None:
            return self._save_adapter()
        model_dir = self.run_dir / "model"
        tokenizer_dir = self.run_dir / RUN_TOKENIZER_DIR
        if self.whole_model:
            if self.dist.is_main:
                save_model_dir(unwrap(self.wrapped), self.tokenizer, model_dir, overwrite=True,
                               generation_eos=generation_eos)
        else:
            # Sharded layouts: the final checkpoint (always written at max_steps) is consolidated into one model.
            from ..parallel.checkpoint import consolidate

            barrier()
            if self.dist.is_main:
                consolidate(latest_checkpoint(self.run_dir / "checkpoints"), model_dir, tokenizer_dir=tokenizer_dir,
                            overwrite=True, generation_eos=generation_eos)
        barrier()
        return model_dir

    def _save_adapter(self) -> Path:
        """run_dir/adapter: the adapter in PEFT's format (forgeline's for bottleneck adapters), the base it belongs
        to (forgeline_base.json) and the run's tokenizer; `forgeline merge` makes a whole model of it."""
        from ..peft.apply import apply_peft, save_adapter

        out = self.run_dir / "adapter"
        state = full_trainable_state(self)
        if self.dist.is_main:
            model = unwrap(self.wrapped)
            if not self.whole_model:  # the sharded model cannot be written directly: a whole copy on rank 0
                model, _ = initial_model(self.cfg, torch.device("cpu"))
                apply_peft(model, self.cfg.peft, precision=self.cfg.train.precision,
                           fingerprint=self.peft.base_sha256)
                model.load_state_dict(state, strict=False)
            save_adapter(model, self.cfg.peft, out, base=self.base_reference(), tokenizer=self.tokenizer,
                         overwrite=True)
            print(f"adapter written to {out} (base {self.cfg.init}); a whole model: forgeline merge {out} "
                  f"--out {self.run_dir / 'merged'}", flush=True)
        barrier()
        return out


def full_trainable_state(run: "Run") -> dict[str, torch.Tensor] | None:
    """The trained weights gathered whole on rank 0 (None on other ranks); collective under FSDP2."""
    if run.whole_model:
        model = unwrap(run.wrapped)
        return {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(unwrap(run.wrapped), options=StateDictOptions(
        full_state_dict=True, cpu_offload=True, ignore_frozen_params=True))
    return state if run.dist.is_main else None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} cannot be read ({exc})") from None


def write_memory_report(run_dir: Path, cfg: StageConfig, dist: DistInfo, model, optimizer) -> None:
    """run_dir/memory.json: the planner's per-rank estimate (`forgeline plan memory`) beside the parameter and
    optimizer bytes every rank actually holds."""
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


def run_stage(cfg: StageConfig, resume: bool | str, body: Callable[[Run], T], **checks) -> T:
    """Check the layout, start the process group, run the stage (`run_in_group`), shut down."""
    check_parallel_config(cfg, int(os.environ.get("WORLD_SIZE", "1")), **checks)
    dist = init_distributed(cfg.train.device)
    try:
        return run_in_group(dist, cfg, resume, body, **checks)
    finally:
        shutdown()


def run_in_group(dist: DistInfo, cfg: StageConfig, resume: bool | str, body: Callable[[Run], T], **checks) -> T:
    """A stage inside a process group that already exists (run_stage's, or a test driving several runs in one
    torchrun): the layout for this world, the checkpoint to resume from, then `body`."""
    layout = check_parallel_config(cfg, dist.world_size, **checks)
    run = Run(cfg=cfg, dist=dist, layout=layout)
    run.resume_from = choose_resume_checkpoint(run.run_dir, resume, dist)
    return body(run)
