"""Apply a layout to the model: the one place where parallelism meets the model, in a fixed order.

    1. pipeline split   keep only this rank's stage(s): layers by count (or parallel.pp_split_points); the embedding
                        lives on the first stage, the final norm and output projection on the last
    2. tensor parallel  per block, DTensor `parallelize_module`: wq/wk/wv/w1/w3 column-wise, wo/w2 row-wise; with
                        sequence_parallel the two norms run on sequence shards (SequenceParallel) and the
                        projections' all-reduce becomes reduce-scatter + all-gather (same bytes, 1/tp activation
                        memory for norms and residuals); the hidden state enters the first block of a stage
                        replicated and leaves its last block replicated again
    3. activation checkpointing (per block)
    4. torch.compile (per block)
    5. FSDP2           fully_shard per block, then the stage root (embedding, final norm, output), over the
                        data-parallel mesh: 1-D (FSDP) or 2-D (HSDP, replicate x shard); reshard-after-forward on =
                        ZeRO-3, off = ZeRO-2; MixedPrecisionPolicy(param bf16, reduce fp32) when training in bf16
    6. pipeline stages PipelineStage per local stage and the configured schedule (GPipe, 1F1B, interleaved 1F1B)

Embedding and output projection are *not* vocab-parallel: the objectives compute the loss from the final hidden
states and the output weight with a chunked cross-entropy that never materialises the logits
(objectives/causal_lm.py), which needs the whole vocabulary row; so these two tables are replicated over the tp
ranks and sharded by FSDP over the data-parallel ranks instead (with dp x tp ranks they cost 1/dp of their size per
rank rather than 1/(dp x tp)). transformer.py holds no parallel code: the heads per rank come from the local shard
of the projection weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..config import StageConfig
from ..errors import ConfigError
from ..model.transformer import Transformer
from ..train.distributed import DistInfo
from .layout import MESH_DIMS, Layout, split_layers


@dataclass
class Parallelized:
    """What the trainer needs from a parallel layout."""

    model: nn.Module  # the rank's model: optimizer parameters, state dicts, train()/eval()
    layout: Layout
    mesh: Any | None  # DeviceMesh over MESH_DIMS (None on one process)
    executor: Any  # a trainer.StepExecutor
    dp_rank: int
    dp_size: int
    sharded: bool  # parameters are DTensors or split over stages: checkpoints go through DCP
    stages: list[nn.Module] = field(default_factory=list)
    stage_ids: list[int] = field(default_factory=list)


def build_mesh(layout: Layout, device: torch.device):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, layout.shape, mesh_dim_names=MESH_DIMS)


def dp_mesh(mesh, layout: Layout):
    """The mesh FSDP2 shards over: (dp_replicate, dp_shard) for HSDP, else dp_shard."""
    if layout.dp_replicate > 1:
        return mesh["dp_replicate", "dp_shard"]
    return mesh["dp_shard"]


# ---------------------------------------------------------------------------------------------------------------
# 1. pipeline split
# ---------------------------------------------------------------------------------------------------------------


def local_stage_ids(layout: Layout) -> list[int]:
    """Stages of this pp rank: rank r holds stages r, r + pp, r + 2 pp, ... (the looped layout interleaving needs)."""
    pp_rank = layout.coordinates(_rank())["pp"]
    return [pp_rank + k * layout.pp for k in range(layout.stages_per_rank)]


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def keep_layers(model: Transformer, keep: set[int], *, first: bool, last: bool) -> Transformer:
    """Drop in place what this rank does not hold; names of what stays are unchanged ("layers.5..." stays)."""
    for name in list(model.layers.keys()):
        if int(name) not in keep:
            del model.layers[name]
    if not first:
        model.tok_embeddings = None
    if not last:
        model.norm = None
        model.output = None
    return model


def stage_view(model: Transformer, layer_ids: range, *, first: bool, last: bool) -> Transformer:
    """A Transformer sharing `model`'s modules but holding only one stage's layers (several stages per rank)."""
    view = Transformer.__new__(Transformer)
    nn.Module.__init__(view)
    view.cfg = model.cfg
    view.tok_embeddings = model.tok_embeddings if first else None
    view.layers = nn.ModuleDict({str(i): model.layers[str(i)] for i in layer_ids})
    view.norm = model.norm if last else None
    view.output = model.output if last else None
    view.register_buffer("inv_freq", model.inv_freq, persistent=False)
    return view


# ---------------------------------------------------------------------------------------------------------------
# 2. tensor parallel
# ---------------------------------------------------------------------------------------------------------------


def apply_tensor_parallel(model: Transformer, tp_mesh, *, sequence_parallel: bool) -> None:
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        PrepareModuleInputOutput,
        PrepareModuleOutput,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    rowwise_out = Shard(1) if sequence_parallel else Replicate()
    names = list(model.layers.keys())
    for index, name in enumerate(names):
        block = model.layers[name]
        plan: dict[str, Any] = {
            "attention.wq": ColwiseParallel(),
            "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(output_layouts=rowwise_out),
            "feed_forward.w1": ColwiseParallel(),
            "feed_forward.w3": ColwiseParallel(),
            "feed_forward.w2": RowwiseParallel(output_layouts=rowwise_out),
        }
        if sequence_parallel:
            plan.update({
                "attention_norm": SequenceParallel(),
                # block inputs: (x, cos, sin, mask, kv_cache); only x is sharded over the sequence
                "attention": PrepareModuleInput(input_layouts=(Shard(1), None, None, None, None),
                                                desired_input_layouts=(Replicate(), None, None, None, None)),
                "ffn_norm": SequenceParallel(),
                "feed_forward": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            })
        parallelize_module(block, tp_mesh, plan)
        if sequence_parallel:
            # Between blocks the residual stream is the local sequence shard; outside the stage's blocks it is
            # whole (the embedding, final norm and loss see every position). Replicate -> Shard(1) is a local
            # slice, Shard(1) -> Replicate an all-gather.
            first, last = index == 0, index == len(names) - 1
            ins = dict(input_layouts=(Replicate(), None, None, None, None),
                       desired_input_layouts=(Shard(1), None, None, None, None))
            outs = dict(output_layouts=(Shard(1),), desired_output_layouts=(Replicate(),))
            if first and last:
                parallelize_module(block, tp_mesh, PrepareModuleInputOutput(**ins, use_local_input=True, **outs))
            elif first:
                parallelize_module(block, tp_mesh, PrepareModuleInput(**ins, use_local_output=True))
            elif last:
                parallelize_module(block, tp_mesh, PrepareModuleOutput(**outs))


# ---------------------------------------------------------------------------------------------------------------
# 3-5. activation checkpointing, compile, FSDP2
# ---------------------------------------------------------------------------------------------------------------


def apply_activation_checkpointing(model: Transformer) -> None:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for name in list(model.layers.keys()):
        model.layers[name] = checkpoint_wrapper(model.layers[name])


def apply_compile(model: Transformer) -> None:
    for block in model.layers.values():
        block.compile()


def mixed_precision_policy(cfg: StageConfig):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    param = cfg.parallel.param_dtype
    if param == "auto":
        param = "bf16" if cfg.train.precision == "bf16" else "fp32"
    return MixedPrecisionPolicy(param_dtype=dtypes[param], reduce_dtype=dtypes[cfg.parallel.reduce_dtype])


def apply_fsdp(stages: list[Transformer], mesh, *, reshard_after_forward: bool, mp_policy) -> None:
    from torch.distributed.fsdp import fully_shard

    for stage in stages:
        for block in stage.layers.values():
            fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=mp_policy)
        # The root keeps its parameters gathered after forward (they are needed at once by the loss and backward).
        fully_shard(stage, mesh=mesh, mp_policy=mp_policy)


# ---------------------------------------------------------------------------------------------------------------
# everything, in order
# ---------------------------------------------------------------------------------------------------------------


def parallelize(model: Transformer, cfg: StageConfig, layout: Layout, dist: DistInfo) -> Parallelized:
    """Wrap a whole, initialised model (identical on every rank) for `layout`; see the module docstring."""
    from .executor import PipelineExecutor, ShardedExecutor

    if layout.world_size != dist.world_size:
        raise ConfigError(f"layout for {layout.world_size} ranks on a world of {dist.world_size}")
    mesh = build_mesh(layout, dist.device)
    coords = layout.coordinates(dist.rank)
    n_stages = layout.n_stages
    stage_ids = local_stage_ids(layout) if layout.pp > 1 else [0]
    if layout.pp > 1:
        ranges = split_layers(model.cfg.n_layers, n_stages, cfg.parallel.pp_split_points)
        keep = {i for s in stage_ids for i in ranges[s]}
        keep_layers(model, keep, first=0 in stage_ids, last=n_stages - 1 in stage_ids)
        if len(stage_ids) == 1:
            stages = [model]
        else:
            stages = [stage_view(model, ranges[s], first=s == 0, last=s == n_stages - 1) for s in stage_ids]
    else:
        stages = [model]

    if layout.tp > 1:
        for stage in stages:
            apply_tensor_parallel(stage, mesh["tp"], sequence_parallel=cfg.parallel.sequence_parallel)
    if cfg.train.activation_checkpointing:
        apply_activation_checkpointing(model)
        for stage, s in zip(stages, stage_ids):
            if stage is not model:  # views share the blocks; refresh them to the wrapped ones
                for name in list(stage.layers.keys()):
                    stage.layers[name] = model.layers[name]
    if cfg.train.compile:
        apply_compile(model)
    if layout.dp > 1:
        apply_fsdp(stages, dp_mesh(mesh, layout), reshard_after_forward=cfg.parallel.fsdp_reshard_after_forward,
                   mp_policy=mixed_precision_policy(cfg))

    dp_rank = layout.dp_rank(dist.rank)
    if layout.pp > 1:
        executor = PipelineExecutor(stages, stage_ids, n_stages, layout=layout, coords=coords, mesh=mesh,
                                    cfg=cfg.parallel, micro_batch_size=cfg.train.micro_batch_size, device=dist.device)
    else:
        executor = ShardedExecutor(layout=layout, coords=coords)
    return Parallelized(model=model, layout=layout, mesh=mesh, executor=executor, dp_rank=dp_rank,
                        dp_size=layout.dp, sharded=True, stages=stages, stage_ids=stage_ids)
