"""Process-group set-up for torchrun: the same command runs on one process or many.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; without them this is a single process and nothing is initialised.
gloo serves CPU runs, nccl GPU runs. Data parallelism here is DDP; sharded and model-parallel layouts wrap the same
model from outside (see the distributed issue) and never change the model file.
"""

from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import ConfigError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(preference: str, local_rank: int = 0) -> torch.device:
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("train.device: 'cuda' was asked for but no CUDA device is available")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(device_preference: str = "auto") -> DistInfo:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_preference, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        with _preemption_signals_blocked():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", device_id=device
                                    if device.type == "cuda" else None)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


@contextmanager
def _preemption_signals_blocked():
    """The threads the process group starts (gloo's I/O loop and workers) inherit this mask, so a preemption signal
    is always delivered to the main thread, whose Python handler records it; a signal landing on a gloo thread
    would interrupt its socket calls mid-collective instead."""
    wanted = {getattr(signal, name) for name in ("SIGTERM", "SIGUSR1") if hasattr(signal, name)}
    if not wanted or threading.current_thread() is not threading.main_thread() or not hasattr(signal,
                                                                                               "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, wanted)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def shutdown() -> None:
    """A barrier first: tearing a group down while a peer is still in a collective aborts under gloo/FSDP2."""
    if dist.is_initialized():
        barrier()
        dist.destroy_process_group()


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare model under DDP (`.module`) or torch.compile (`._orig_mod`) wrappers."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def reshard_fsdp(model: torch.nn.Module) -> None:
    """Put every FSDP2 module of `model` back in its sharded state. FSDP2 leaves the root gathered after a forward
    (its backward needs the parameters at once) and, while gathered, the module holds the unsharded tensors as its
    parameters; after a forward with no backward (a no-gradient pass: validation, the reference's log-probs) they
    would stay there, and an optimizer built then, or a checkpoint taken then, would see other tensors than the
    sharded parameters it trains."""
    from torch.distributed.fsdp import FSDPModule

    for module in unwrap(model).modules():
        if isinstance(module, FSDPModule):
            module.reshard()
