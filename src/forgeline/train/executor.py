"""The contracts between the loop and everything it drives: objectives, step executors and checkpointers.

An objective is a function `(model, batch) -> LossOutput`. It sums its loss over the batch's units (target
tokens for language modelling, sequences, preference pairs), and the trainer divides by the number of units in the
whole optimizer step (every accumulation micro-batch on every rank), so an update does not depend on how the step
is split. The number of units must be known before the backward passes, so the collator puts it in the batch under
the objective's `count_key` ("n_targets" unless the objective says otherwise) and the objective reports the same
number back. Metrics are sums over the same units too: the trainer reduces them over micro-batches and ranks and
divides by the same total, so a logged metric is a true mean over the step, not a mean of micro-batch means.

A step executor runs one step's micro-batches forward and backward for one layout (this module's default holds a
whole model per rank; forgeline.parallel adds FSDP2 / tensor-parallel, pipeline and DeepSpeed ones). A checkpointer
saves and restores the trained state for one layout's storage format.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
from torch import nn

from ..kernels.bf16_matmul import bf16_autocast
from .distributed import DistInfo

DEFAULT_COUNT_KEY = "n_targets"


@dataclass
class LossOutput:
    """An objective's result for one micro-batch."""

    loss: torch.Tensor  # summed over the batch's units
    count: int  # the batch's units (tokens, sequences or pairs): the step's total normalises the loss
    tokens: int  # tokens the forward passes processed, padding excluded: what tokens/s and MFU count
    metrics: dict[str, float] = field(default_factory=dict)  # sums over the same units


Objective = Callable[[nn.Module, dict[str, Any]], LossOutput]


def count_key(objective: Objective) -> str:
    """The batch key holding the number of units `objective` normalises by."""
    return getattr(objective, "count_key", DEFAULT_COUNT_KEY)


def batch_tokens(batch: dict[str, Any]) -> int:
    """Real tokens in a batch: the collator's `n_tokens`, else every input position (unpadded token rows)."""
    if "n_tokens" in batch:
        return int(batch["n_tokens"])
    return int(batch["input_ids"].numel())


@dataclass
class StepTotals:
    """One rank's sums over one step's micro-batches."""

    loss: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.float64))
    tokens: int = 0
    metrics: dict[str, float] = field(default_factory=dict)

    def add(self, out: LossOutput) -> None:
        self.loss += out.loss.detach().double().cpu()
        self.tokens += int(out.tokens)
        for key, value in out.metrics.items():
            self.metrics[key] = self.metrics.get(key, 0.0) + float(value)


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def autocast_context(device: torch.device, precision: str):
    """bf16 autocast for the forward pass; parameters, gradients and optimizer state stay fp32 (master weights).
    On CPUs whose fp32 units outrun their bf16 ones, the bf16 products run there (kernels/bf16_matmul.py)."""
    if precision == "bf16":
        return bf16_autocast(device)
    return contextlib.nullcontext()


class StepExecutor:
    """How one optimizer step's micro-batches run forward and backward; the trainer's loop is the same for every
    layout.

    This default holds a whole model per rank (one process, or DDP, whose gradient sync happens on the last
    micro-batch only).

    dp_size: ranks that see different data (DDP and FSDP average gradients over them).
    counts_targets / reports_loss: whether this rank's unit count / loss sum enter the global sums (False on
    ranks that repeat a peer's batch, e.g. the other tensor-parallel ranks, or hold no loss, e.g. early pipeline
    stages).
    supports(objective): whether this layout can run that objective (the pipeline executor runs only those whose
    loss is computable from the last stage's hidden states).
    """

    dp_size: int = 1
    counts_targets: bool = True
    reports_loss: bool = True

    def __init__(self, dist: DistInfo | None = None):
        self.dp_size = dist.world_size if dist is not None else 1

    def supports(self, objective: Objective) -> bool:
        return True

    def forward_backward(self, model: nn.Module, loss_fn: Objective, micro_batches: list[dict[str, Any]], *,
                         scale: float, precision: str, device: torch.device) -> StepTotals:
        """Backward of `scale` x the summed loss of every micro-batch; returns this rank's sums."""
        totals = StepTotals()
        is_ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
        for i, batch in enumerate(micro_batches):
            batch = to_device(batch, device)
            last = i == len(micro_batches) - 1
            sync = contextlib.nullcontext() if (last or not is_ddp) else model.no_sync()
            with sync:
                with autocast_context(device, precision):
                    out = loss_fn(model, batch)
                (out.loss * scale).backward()
            totals.add(out)
        return totals

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loss_fn: Objective, batch: dict[str, Any], *, precision: str,
                 device: torch.device) -> torch.Tensor:
        """The summed loss of one evaluation batch (no gradient)."""
        with autocast_context(device, precision):
            out = loss_fn(model, to_device(batch, device))
        return out.loss.detach().double().cpu()

    def clip_grad_norm(self, params: list[torch.Tensor], max_norm: float) -> float:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm=max_norm, foreach=True))

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def skip_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Discard this step's gradients (non-finite loss or gradient norm)."""
        optimizer.zero_grad(set_to_none=True)


class Checkpointer(Protocol):
    """Saves and restores the trained state (weights, optimizer, RNG, trainer state) in one layout's format.
    Every rank calls both; `save` returns once the checkpoint is complete and renamed into place."""

    def save(self, checkpoint_root: Path, step: int, *, model: nn.Module, optimizer: torch.optim.Optimizer,
             trainer_state: dict[str, Any], config_yaml: str, keep_last: int, dist: DistInfo) -> Path | None: ...

    def load(self, path: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer | None, dist: DistInfo,
             verify: bool = True) -> dict[str, Any]: ...
