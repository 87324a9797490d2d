"""The DeepSpeed ZeRO-3 backend (`parallel.backend: deepspeed`, the optional `forgeline[deepspeed]` extra).

The same model, data loader, objective and trainer loop as the native layouts; DeepSpeed owns the parameters'
partitioning, the gradient reduction, the optimizer step (torch AdamW with forgeline's parameter groups, wrapped by
ZeRO-3's partitioned optimizer) and its checkpoint files. On CPU it runs with DS_ACCELERATOR=cpu over gloo.

* The objective reads the output projection's weight outside that module's forward (the chunked cross-entropy);
  the model therefore runs inside a small module whose forward is the loss, with the weight registered as its
  external parameter, so ZeRO-3 gathers it for the loss.
* Gradient clipping is DeepSpeed's (`gradient_clipping` = train.grad_clip); a non-finite gradient norm makes
  DeepSpeed skip the step itself. The spike rollback is not available (it needs the trainer to discard the pending
  gradients, which ZeRO-3 keeps in its own buffers): set stability.max_rollbacks=0.
* Checkpoints: `step_N/deepspeed/` in DeepSpeed's format (resumable with this backend and the same world size),
  beside forgeline's trainer_state.json; the manifest rank 0 writes last covers DeepSpeed's files too, so a damaged
  one is found before DeepSpeed unpickles it. `forgeline export consolidate` turns one into a safetensors model.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError
from ..model.formats.checkpoint import DEEPSPEED_DIR, verify_checkpoint
from ..train.checkpoint import set_rng_state
from ..train.executor import StepExecutor, StepTotals, to_device
from .checkpoint import begin_multirank_save, finish_multirank_save, write_rank_and_run_state

# DeepSpeed's files go under step_N/deepspeed/, also the tag they are saved under (what readers expect)
TAG = DEEPSPEED_DIR


def import_deepspeed(device: torch.device):
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if device.type == "cpu" else "cuda")
    try:
        import deepspeed
    except ImportError:
        raise ConfigError("parallel.backend=deepspeed needs DeepSpeed: pip install 'forgeline[deepspeed]'") from None
    return deepspeed


class LossModule(nn.Module):
    """forward(batch) = loss_fn(model, batch): the whole objective inside one forward, as ZeRO-3 needs. The engine
    sees only the loss tensor (ZeRO-3's hooks follow tensors in tuples and dicts, not inside a dataclass); the rest
    of the objective's output waits in `last`."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.loss_fn = None
        self.last = None

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        self.last = self.loss_fn(self.model, batch)
        return self.last.loss


class DeepSpeedExecutor(StepExecutor):
    def __init__(self, engine, world_size: int):
        self.engine = engine
        self.dp_size = world_size

    def forward_backward(self, model, loss_fn, micro_batches, *, scale, precision, device):
        totals = StepTotals()
        self.engine.module.loss_fn = loss_fn
        for batch in micro_batches:
            # no autocast: with train.precision=bf16 DeepSpeed holds bf16 parameters (fp32 master copies in the
            # optimizer) and the model computes in bf16 directly
            loss = self.engine(to_device(batch, device))
            # our scale already turns DeepSpeed's mean over ranks into the mean over the step's targets
            self.engine.backward(loss * scale, scale_wrt_gas=False)
            totals.add(self.engine.module.last)
        return totals

    @torch.no_grad()
    def evaluate(self, model, loss_fn, batch, *, precision, device):
        self.engine.module.loss_fn = loss_fn
        return self.engine(to_device(batch, device)).detach().double().cpu()

    def clip_grad_norm(self, params, max_norm) -> float:
        # The norm DeepSpeed's step will clip with (ZeRO-3's partitioned gradients, all-reduced).
        from deepspeed.runtime.utils import get_global_norm

        groups = self.engine.optimizer._get_norm_groups()
        return float(get_global_norm(norm_list=[float(g) for g in groups]))

    def optimizer_step(self, optimizer) -> None:
        self.engine.step()

    def skip_step(self, optimizer) -> None:
        self.engine.step()  # ZeRO-3 sees the non-finite norm, skips the update and clears its buffers


class DeepSpeedCheckpointer:
    def __init__(self, engine, layout_description: str):
        self.engine = engine
        self.layout_description = layout_description

    def save(self, checkpoint_root: Path, step: int, *, model, optimizer, trainer_state, config_yaml, keep_last,
             dist) -> Path:
        final, tmp = begin_multirank_save(checkpoint_root, step, dist)
        try:
            self.engine.save_checkpoint(str(tmp), tag=TAG, save_latest=False)
            write_rank_and_run_state(tmp, step, "deepspeed", self.layout_description, trainer_state, config_yaml,
                                     dist)
        except BaseException:
            if dist.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        return finish_multirank_save(tmp, final, checkpoint_root, keep_last, dist)

    def load(self, path: Path, *, model, optimizer, dist, verify: bool = True) -> dict[str, Any]:
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / TAG).is_dir():
            raise CheckpointError(f"{path} was not written by the DeepSpeed backend; it resumes with "
                                  "parallel.backend=native (or export its weights: forgeline export consolidate)")
        if verify:
            verify_checkpoint(path)
        state = json.loads((path / "trainer_state.json").read_text())
        if state.get("world_size") not in (None, dist.world_size):
            raise CheckpointError(f"{path} holds DeepSpeed ZeRO-3 shards of {state['world_size']} ranks; resume it "
                                  f"on {state['world_size']} ranks, not {dist.world_size}")
        self.engine.load_checkpoint(str(path), tag=TAG, load_optimizer_states=True, load_lr_scheduler_states=False)
        rng = path / "rng" / f"rank_{dist.rank:05d}.safetensors"
        if rng.is_file():
            set_rng_state(load_file(str(rng)), json.loads(rng.with_suffix(".json").read_text()))
        return state


@dataclass
class DeepSpeedSetup:
    engine: Any
    optimizer: Any
    executor: DeepSpeedExecutor
    checkpointer: DeepSpeedCheckpointer


def deepspeed_config(cfg, grad_accum_steps: int) -> dict[str, Any]:
    ds = cfg.parallel.deepspeed
    zero: dict[str, Any] = {"stage": ds.zero_stage, "overlap_comm": ds.overlap_comm, "contiguous_gradients": True}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": grad_accum_steps,
        "gradient_clipping": cfg.train.grad_clip or 0.0,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.train.precision == "bf16"},
        "zero_allow_untested_optimizer": True,  # torch AdamW with forgeline's parameter groups
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def deepspeed_setup(model: nn.Module, cfg, dist, grad_accum_steps: int) -> DeepSpeedSetup:
    if cfg.stability.max_rollbacks > 0:
        raise ConfigError("parallel.backend=deepspeed does not support the loss-spike rollback; set "
                          "stability.max_rollbacks=0 (non-finite steps are still skipped)")
    deepspeed = import_deepspeed(dist.device)
    from ..train.optim import param_groups

    wrapper = LossModule(model)
    t = cfg.train
    groups = param_groups(model, t.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=t.lr, betas=t.betas, eps=t.eps)
    engine, ds_optimizer, _, _ = deepspeed.initialize(model=wrapper, optimizer=optimizer,
                                                      config=deepspeed_config(cfg, grad_accum_steps),
                                                      dist_init_required=False)
    if model.output is not None:
        deepspeed.zero.register_external_parameter(engine.module, model.output.weight)
    from .layout import resolve_layout

    layout = resolve_layout(cfg.parallel, dist.world_size)
    return DeepSpeedSetup(engine=engine, optimizer=ds_optimizer,
                          executor=DeepSpeedExecutor(engine, dist.world_size),
                          checkpointer=DeepSpeedCheckpointer(engine, f"DeepSpeed ZeRO-3 ({layout.describe()})"))
