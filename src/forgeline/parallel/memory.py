"""Per-rank memory accounting: what a layout costs each rank, before anything is launched (`forgeline plan memory`).

The state terms are exact counts of what `forgeline.parallel.apply` puts on a rank (checked against the tensors of
real runs in tests/test_parallel.py):

    parameters   fp32 master weights: each block's projections split over tp (the norms replicated), the stage's
                 layers only (pp), every tensor split over dp_shard by FSDP2 (dim 0, rounded up); the embedding and
                 output projection are replicated over tp (not vocab-parallel, see apply.py)
    gradients    fp32, the same shards as the parameters (FSDP2 reduce-scatters into shards; DDP keeps full ones)
    optimizer    AdamW's exp_avg and exp_avg_sq, fp32, the same shards again

The transient terms are estimates:

    gathered     FSDP2's all-gathered parameters (param dtype) during forward/backward: with
                 reshard_after_forward (ZeRO-3) the stage root plus two blocks (the running and the prefetched one);
                 without (ZeRO-2) every block of the stage stays gathered from its forward to its backward; the
                 unsharded gradients of one block before its reduce-scatter (reduce dtype) come on top
    activations  what backward keeps per token and layer for this model (RMSNorm in fp32, q/k/v, attention output,
                 SwiGLU's w1/w3 outputs and product; SDPA's flash kernel keeps no score matrix), divided by tp for
                 the sharded parts (and the norms and residuals too with sequence parallelism); activation
                 checkpointing keeps only each block's input plus one block recomputed at a time; the pipeline keeps
                 GPipe: every micro-batch, 1F1B: up to pp micro-batches in flight on the first stage

Allocator fragmentation, communication buffers, CUDA context and kernels' workspaces are not counted: leave
10-20% of the device free on top of the total.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from ..config import ParallelConfig, StageConfig
from ..model.config import ModelConfig
from .layout import Layout, resolve_layout, split_layers

GIB = 1024**3


@dataclass
class MemoryEstimate:
    layout: str
    stage: int  # the pipeline stage of the worst-off rank (the one reported)
    params_bytes: int
    grads_bytes: int
    optimizer_bytes: int
    gathered_bytes: int
    activation_bytes: int

    @property
    def state_bytes(self) -> int:
        return self.params_bytes + self.grads_bytes + self.optimizer_bytes

    @property
    def total_bytes(self) -> int:
        return self.state_bytes + self.gathered_bytes + self.activation_bytes

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "state_bytes": self.state_bytes, "total_bytes": self.total_bytes}


def _shard_rows(rows: int, cols: int, dp_shard: int) -> int:
    """Elements a rank holds of a (rows, cols) tensor that FSDP2 splits on dim 0 over dp_shard ranks (rounded up)."""
    return math.ceil(rows / dp_shard) * cols


def stage_param_numel(cfg: ModelConfig, layout: Layout, layers: range, *, first: bool, last: bool) -> int:
    """Parameters held by one rank of a stage: TP shards, then FSDP2 shards of those."""
    tp, ds = layout.tp, layout.dp_shard
    hd, d = cfg.head_size, cfg.dim
    q_out, kv_out = cfg.n_heads * hd // tp, cfg.kv_heads * hd // tp
    per_block = 0
    for rows, cols in ((q_out, d), (kv_out, d), (kv_out, d), (d, q_out),  # wq wk wv (colwise), wo (rowwise: dim 1)
                       (cfg.ffn_dim // tp, d), (cfg.ffn_dim // tp, d), (d, cfg.ffn_dim // tp),  # w1 w3, w2
                       (d, 1), (d, 1)):  # the two norms
        per_block += _shard_rows(rows, cols, ds)
    if cfg.qkv_bias:
        per_block += _shard_rows(q_out, 1, ds) + 2 * _shard_rows(kv_out, 1, ds)
    total = per_block * len(layers)
    if first:
        total += _shard_rows(cfg.vocab_size, d, ds)
    if last:
        total += _shard_rows(d, 1, ds)
        if not cfg.tie_embeddings:
            total += _shard_rows(cfg.vocab_size, d, ds)
    return total


def _block_numel_unsharded(cfg: ModelConfig, tp: int) -> int:
    hd, d = cfg.head_size, cfg.dim
    return (2 * d * cfg.n_heads * hd + 2 * d * cfg.kv_heads * hd + 3 * d * cfg.ffn_dim) // tp + 2 * d


def activation_bytes_per_token_layer(cfg: ModelConfig, tp: int, *, sequence_parallel: bool, act_bytes: int) -> float:
    d, hd = cfg.dim, cfg.head_size
    q, kv = cfg.n_heads * hd, cfg.kv_heads * hd
    sp = tp if (sequence_parallel and tp > 1) else 1
    # two RMSNorms: fp32 input + their output in the compute dtype (the input of the following projections)
    norms = 2 * (4 * d) / sp + 2 * act_bytes * d  # (the output is gathered whole for the projections)
    attention = act_bytes * (2 * q + 2 * kv) / tp  # q, k, v after rotary and the attention output
    mlp = act_bytes * 4 * cfg.ffn_dim / tp  # w1 and w3 outputs, silu(w1), their product
    return norms + attention + mlp


def estimate_memory(cfg: StageConfig, world_size: int) -> MemoryEstimate:
    """The worst-off rank's memory for `cfg` (model, batch, precision, layout) on `world_size` ranks."""
    model = cfg.model
    if model.vocab_size is None:
        model = model.model_copy(update={"vocab_size": 32000})
    pcfg: ParallelConfig = cfg.parallel
    layout = resolve_layout(pcfg, world_size, model)
    precision = cfg.train.precision
    param_dtype = pcfg.param_dtype if pcfg.param_dtype != "auto" else precision
    param_bytes_gathered = 2 if param_dtype == "bf16" else 4
    reduce_bytes = 2 if pcfg.reduce_dtype == "bf16" else 4
    act_bytes = 2 if precision == "bf16" else 4
    n_stages = layout.n_stages
    ranges = split_layers(model.n_layers, n_stages, pcfg.pp_split_points if layout.pp > 1 else None)
    stages_of_rank = [[r + k * layout.pp for k in range(layout.stages_per_rank)] for r in range(layout.pp)]
    seq = cfg.seq_len()
    n_micro = (pcfg.pp_microbatches or layout.n_stages) if layout.pp > 1 else 1
    mb_tokens = cfg.train.micro_batch_size * seq / n_micro
    per_layer = activation_bytes_per_token_layer(model, layout.tp, sequence_parallel=pcfg.sequence_parallel,
                                                 act_bytes=act_bytes)
    best: MemoryEstimate | None = None
    for pp_rank, stage_ids in enumerate(stages_of_rank):
        layers = [i for s in stage_ids for i in ranges[s]]
        numel = sum(stage_param_numel(model, layout, ranges[s], first=s == 0, last=s == n_stages - 1)
                    for s in stage_ids)
        params = 4 * numel
        optimizer = 8 * numel
        gathered = 0
        if layout.uses_fsdp:
            block = _block_numel_unsharded(model, layout.tp)
            root = (model.vocab_size * model.dim if 0 in stage_ids else 0) + (
                model.vocab_size * model.dim + model.dim if n_stages - 1 in stage_ids else 0)
            blocks_gathered = 2 if pcfg.fsdp_reshard_after_forward else len(layers)
            gathered = param_bytes_gathered * (root + blocks_gathered * block) + reduce_bytes * block
        # pipeline micro-batches whose activations are alive at once on this rank
        if layout.pp == 1:
            in_flight = 1
        elif pcfg.pp_schedule == "gpipe":
            in_flight = n_micro
        else:
            in_flight = min(n_micro, layout.pp - pp_rank + (layout.stages_per_rank - 1) * layout.pp)
        if cfg.train.activation_checkpointing:
            saved = 4 * model.dim / (layout.tp if pcfg.sequence_parallel and layout.tp > 1 else 1)
            act = mb_tokens * (saved * len(layers) * in_flight + per_layer)
        else:
            act = mb_tokens * per_layer * len(layers) * in_flight
        act += mb_tokens * 4 * model.dim * 2  # embedding output / final norm input, fp32
        est = MemoryEstimate(layout=layout.describe(), stage=stage_ids[0], params_bytes=int(params),
                             grads_bytes=int(params), optimizer_bytes=int(optimizer), gathered_bytes=int(gathered),
                             activation_bytes=int(act))
        if best is None or est.total_bytes > best.total_bytes:
            best = est
    assert best is not None
    return best


def measure_state_bytes(model, optimizer) -> dict[str, int]:
    """Bytes of this rank's parameter and optimizer-state tensors as they are held (local shards of DTensors)."""
    import torch

    def local(t):
        return t.to_local() if hasattr(t, "to_local") and hasattr(t, "placements") else t

    seen, params = set(), 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        t = local(p)
        params += t.numel() * t.element_size()
    opt = 0
    for state in optimizer.state.values():
        for value in state.values():
            if torch.is_tensor(value) and value.dim() > 0:
                t = local(value)
                opt += t.numel() * t.element_size()
    return {"params_bytes": params, "optimizer_bytes": opt}
