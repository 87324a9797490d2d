"""Step executors for sharded layouts: how one optimizer step's forward and backward passes run.

The trainer's loop is the same for every layout (trainer.StepExecutor is the single-process / DDP one). What
changes here:

* which ranks' counts and losses enter the global sums: the tp ranks of a group see the same batch and compute the
  same loss, and with a pipeline only the last stage has a loss, so one rank per data-parallel replica reports;
* the backward goes through the pipeline schedule's step() when pp > 1;
* the gradient norm is the norm of the whole model's gradient whatever the sharding (DTensor shards over
  FSDP and TP meshes, different pipeline stages on different ranks).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from ..errors import ConfigError
from ..train.executor import StepExecutor, StepTotals, autocast_context, batch_tokens, to_device
from .layout import Layout


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") and hasattr(t, "placements") else t


def _copies(t: torch.Tensor, ranks_per_stage: int) -> int:
    """How many ranks of one pipeline stage hold this exact shard of `t` (1 for a fully sharded tensor)."""
    placements = getattr(t, "placements", None)
    if placements is None:
        return ranks_per_stage
    pieces = 1
    for dim, placement in enumerate(placements):
        if not (placement.is_replicate() or placement.is_partial()):  # Shard, or FSDP-over-TP's _StridedShard
            pieces *= t.device_mesh.size(dim)
    return ranks_per_stage // pieces


@torch.no_grad()
def finalize_partial_grads(params: list[torch.Tensor]) -> None:
    """Sum pending partial gradients: a replicated tensor-parallel parameter that sees only a shard of the sequence
    (the sequence-parallel norms) gets a Partial(sum) gradient, which the norm below must not read as local."""
    from torch.distributed.tensor import Replicate

    for p in params:
        g = p.grad
        placements = getattr(g, "placements", None)
        if placements is not None and any(pl.is_partial() for pl in placements):
            p.grad = g.redistribute(g.device_mesh, [Replicate() if pl.is_partial() else pl for pl in placements])


@torch.no_grad()
def clip_grad_norm(params: list[torch.Tensor], max_norm: float, layout: Layout) -> float:
    """Clip to the global L2 norm of the whole model's gradient; returns that norm (before clipping).

    Each rank sums the squares of its local gradient shards, dividing by the number of ranks that hold the same shard
    (replicas over dp_replicate or tp), so one all-reduce over the world gives the full-model sum exactly once.
    """
    finalize_partial_grads(params)
    grads = [p.grad for p in params if p.grad is not None]
    ranks_per_stage = layout.world_size // layout.pp
    by_copies: dict[int, list[torch.Tensor]] = {}
    for g in grads:
        by_copies.setdefault(_copies(g, ranks_per_stage), []).append(_local(g))
    device = grads[0].device if grads else torch.device("cpu")
    total = torch.zeros((), dtype=torch.float64, device=device)
    for copies, locals_ in by_copies.items():
        norms = torch._foreach_norm([t.float() if t.dtype != torch.float32 else t for t in locals_], 2.0)
        total += torch.stack(norms).double().pow(2).sum() / copies
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
    norm = float(total.sqrt())
    if math.isfinite(norm) and max_norm < math.inf:
        coef = max_norm / (norm + 1e-6)
        if coef < 1.0:
            torch._foreach_mul_([_local(g) for g in grads], coef)
    return norm


class ShardedExecutor(StepExecutor):
    """FSDP2 and/or tensor parallel, no pipeline: every rank runs loss_fn on its data-parallel slice."""

    def __init__(self, *, layout: Layout, coords: dict[str, int]):
        self.layout = layout
        self.dp_size = layout.dp
        self.counts_targets = coords["tp"] == 0
        self.reports_loss = coords["tp"] == 0

    def clip_grad_norm(self, params: list[torch.Tensor], max_norm: float) -> float:
        return clip_grad_norm(params, max_norm, self.layout)


class PipelineExecutor(StepExecutor):
    """pp > 1: the micro-batch of each accumulation step goes through the schedule's step(), which splits it into
    parallel.pp_microbatches pipeline micro-batches and runs forward and backward over the stages."""

    def __init__(self, stages: list[nn.Module], stage_ids: list[int], n_stages: int, *, layout: Layout,
                 coords: dict[str, int], mesh, cfg, micro_batch_size: int, device: torch.device):
        from torch.distributed.pipelining import PipelineStage

        self.layout = layout
        self.dp_size = layout.dp
        self.n_stages = n_stages
        self.stage_ids = stage_ids
        self.has_first = 0 in stage_ids
        self.has_last = n_stages - 1 in stage_ids
        self.counts_targets = coords["tp"] == 0 and coords["pp"] == 0
        self.reports_loss = coords["tp"] == 0 and self.has_last
        self.last_module = stages[stage_ids.index(n_stages - 1)] if self.has_last else None
        n_micro = cfg.pp_microbatches or layout.pp * layout.stages_per_rank
        if micro_batch_size % n_micro:
            raise ConfigError(f"train.micro_batch_size={micro_batch_size} is not divisible by "
                              f"parallel.pp_microbatches={n_micro}: the pipeline splits each micro-batch evenly")
        self.n_microbatches = n_micro
        self.micro_batch_size = micro_batch_size
        group = mesh["pp"].get_group()
        self.pipeline_stages = [PipelineStage(m, s, n_stages, device, group=group) for m, s in zip(stages, stage_ids)]
        self.scale = 1.0
        self.loss_fn: Callable | None = None
        self.schedule = self._build_schedule(cfg.pp_schedule)

    def _build_schedule(self, name: str):
        from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

        kwargs = dict(n_microbatches=self.n_microbatches, loss_fn=self._stage_loss, scale_grads=False)
        if name == "interleaved_1f1b":
            return ScheduleInterleaved1F1B(self.pipeline_stages, **kwargs)
        cls = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[name]
        return cls(self.pipeline_stages[0], **kwargs)

    def _stage_loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        from ..kernels.cross_entropy import cross_entropy_sum

        loss = cross_entropy_sum(hidden, self.last_module.lm_head_weight(), targets)
        return loss * self.scale

    def supports(self, objective) -> bool:
        """Only objectives whose loss the last stage computes from its hidden states and the targets alone."""
        from ..objectives import causal_lm_loss

        return objective is causal_lm_loss

    def _check_loss_fn(self, loss_fn) -> None:
        if not self.supports(loss_fn):
            raise ConfigError(f"pipeline parallelism supports the causal LM objective only, not {loss_fn!r}: the "
                              "loss must be computable from the last stage's hidden states")

    def _run(self, batch: dict[str, Any], *, train: bool) -> torch.Tensor:
        kwargs = {"return_hidden": True}
        if batch.get("doc_ids") is not None:
            kwargs["doc_ids"] = batch["doc_ids"]
        args = (batch["input_ids"],) if self.has_first else ()
        target = batch["targets"] if self.has_last else None
        losses: list[torch.Tensor] = []
        run = self.schedule.step if train else self.schedule.eval
        run(*args, target=target, losses=losses, **kwargs)
        if not self.has_last:
            return torch.zeros((), dtype=torch.float64)
        return sum(loss.detach().double().cpu() for loss in losses) / self.scale

    def forward_backward(self, model, loss_fn, micro_batches, *, scale, precision, device):
        self._check_loss_fn(loss_fn)
        self.scale = scale
        totals = StepTotals()
        for batch in micro_batches:
            batch = to_device(batch, device)
            with autocast_context(device, precision):
                totals.loss += self._run(batch, train=True)
            totals.tokens += batch_tokens(batch)
        return totals

    @torch.no_grad()
    def evaluate(self, model, loss_fn, batch, *, precision, device) -> torch.Tensor:
        self._check_loss_fn(loss_fn)
        if batch["input_ids"].shape[0] % self.n_microbatches:
            raise ConfigError(f"evaluation batch of {batch['input_ids'].shape[0]} is not divisible by "
                              f"parallel.pp_microbatches={self.n_microbatches}")
        self.scale = 1.0
        with autocast_context(device, precision):
            return self._run(to_device(batch, device), train=False)

    def clip_grad_norm(self, params: list[torch.Tensor], max_norm: float) -> float:
        return clip_grad_norm(params, max_norm, self.layout)
