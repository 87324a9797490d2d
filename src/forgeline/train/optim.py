"""AdamW with decoupled weight decay on the matmul weights only, and the warmup + decay learning-rate schedules."""

from __future__ import annotations

import math

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay only the weights of linear layers.

    Norm gains, biases and embedding tables are excluded: decaying a gain pulls it towards zero rather than
    towards the identity, and embedding rows of rare tokens would shrink just from being rarely updated. A tied
    output projection shares the embedding table and so is excluded with it.
    """
    embedding_params = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            if isinstance(module, nn.Linear) and name == "weight" and id(param) not in embedding_params:
                decay.append(param)
            else:
                no_decay.append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(
    model: nn.Module, *, lr: float, weight_decay: float, betas: tuple[float, float], eps: float
) -> torch.optim.AdamW:
    """Fused AdamW where the parameters' device has the kernel (CPU and CUDA do: 4-8x faster than the loop on CPU)."""
    groups = param_groups(model, weight_decay)
    params = [p for g in groups for p in g["params"]]
    devices = {p.device.type for p in params}
    fused = len(devices) == 1 and devices <= {"cpu", "cuda"} and all(p.dtype.is_floating_point for p in params)
    # DTensor parameters (FSDP2/TP) have no fused kernel; foreach is the fast path there.
    if any(type(p).__name__ == "DTensor" or type(p.data).__name__ == "DTensor" for p in params):
        fused = False
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused or None)


class LRSchedule:
    """Linear warmup from 0 to `lr` over `warmup_steps`, then cosine or linear decay to `lr * min_lr_ratio` at
    `decay_steps` (constant after), or no decay at all. Stateless apart from the step, so resuming restores it
    exactly."""

    SHAPES = ("cosine", "linear", "constant")

    def __init__(self, lr: float, warmup_steps: int, decay_steps: int, min_lr_ratio: float, shape: str = "cosine"):
        if shape not in self.SHAPES:
            raise ValueError(f"schedule must be one of {', '.join(self.SHAPES)}, got {shape!r}")
        self.lr, self.warmup_steps, self.min_lr_ratio, self.shape = lr, warmup_steps, min_lr_ratio, shape
        self.decay_steps = max(decay_steps, warmup_steps + 1)
        self.step = 0

    @classmethod
    def from_config(cls, train) -> "LRSchedule":
        if train.max_steps is None:
            raise ValueError("train.max_steps is not resolved: call resolve_schedule(train, steps_per_epoch) first")
        return cls(train.lr, train.warmup_steps, train.decay_steps or train.max_steps, train.min_lr_ratio,
                   getattr(train, "schedule", "cosine"))

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.shape == "constant":
            return self.lr
        progress = min(1.0, (step - self.warmup_steps) / (self.decay_steps - self.warmup_steps))
        min_lr = self.lr * self.min_lr_ratio
        if self.shape == "linear":
            return self.lr - (self.lr - min_lr) * progress
        return min_lr + 0.5 * (self.lr - min_lr) * (1 + math.cos(math.pi * progress))

    def apply(self, optimizer: torch.optim.Optimizer) -> float:
        """Set the learning rate for the current step on every param group; returns it."""
        lr = self.lr_at(self.step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr

    def advance(self) -> None:
        self.step += 1

    def state_dict(self) -> dict:
        return {"step": self.step, "lr": self.lr, "warmup_steps": self.warmup_steps,
                "decay_steps": self.decay_steps, "min_lr_ratio": self.min_lr_ratio, "shape": self.shape}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])


def resolve_schedule(train, steps_per_epoch: int | None):
    """A TrainConfig with its step counts made concrete: `max_steps` from `epochs` (when max_steps is unset) and
    `warmup_steps` from `warmup_ratio`. Stages without epochs (pre-training) pass steps_per_epoch=None."""
    max_steps = train.max_steps
    if max_steps is None:
        if steps_per_epoch is None:
            raise ValueError("train.epochs needs a data set with a known number of steps per epoch")
        max_steps = max(1, math.ceil(train.epochs * steps_per_epoch))
    warmup = train.warmup_steps if train.warmup_ratio is None else math.ceil(train.warmup_ratio * max_steps)
    warmup = min(warmup, max_steps - 1) if max_steps > 1 else 0
    return train.model_copy(update={"max_steps": max_steps, "warmup_steps": warmup})
