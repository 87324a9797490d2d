"""The layout: how many ranks along each parallel dimension, checked against the world size and the model.

Every check runs before any model is built, so a bad layout is one error naming the numbers, never a shape error
from deep inside a collective. The mesh dimensions are ordered (pp, dp_replicate, dp_shard, tp): tensor parallelism
innermost (its collectives are per layer, so its ranks should share the fastest links, i.e. one node), pipeline
outermost (it only sends activations between neighbours).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import ParallelConfig
from ..errors import ConfigError
from ..model.config import ModelConfig

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "tp")


@dataclass(frozen=True)
class Layout:
    world_size: int
    pp: int = 1
    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1
    stages_per_rank: int = 1

    @property
    def dp(self) -> int:
        """Ranks that see different data: the gradient of a step is averaged over these."""
        return self.dp_replicate * self.dp_shard

    @property
    def n_stages(self) -> int:
        return self.pp * self.stages_per_rank

    @property
    def is_plain_data_parallel(self) -> bool:
        """Every rank holds a whole replica: single process or DDP."""
        return self.pp == 1 and self.tp == 1 and self.dp_shard == 1

    @property
    def uses_fsdp(self) -> bool:
        """FSDP2 shards (or, with dp_shard 1 and TP/PP on, replicates) over the data-parallel ranks."""
        return not self.is_plain_data_parallel and self.dp > 1

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.pp, self.dp_replicate, self.dp_shard, self.tp)

    def describe(self) -> str:
        parts = [f"{name}={size}" for name, size in zip(MESH_DIMS, self.shape) if size > 1]
        if self.is_plain_data_parallel:
            kind = "single process" if self.world_size == 1 else "DDP"
        else:
            kind = "+".join(k for k, on in (("FSDP2" if self.dp_replicate == 1 else "HSDP", self.uses_fsdp),
                                              ("TP", self.tp > 1), ("PP", self.pp > 1)) if on)
        return f"{kind} ({', '.join(parts) or 'one rank'}; world {self.world_size})"

    def coordinates(self, rank: int) -> dict[str, int]:
        """This rank's index along each mesh dimension (row-major over MESH_DIMS, as init_device_mesh lays out)."""
        coords = {}
        rest = rank
        for name, size in reversed(list(zip(MESH_DIMS, self.shape))):
            coords[name] = rest % size
            rest //= size
        return coords

    def dp_rank(self, rank: int) -> int:
        c = self.coordinates(rank)
        return c["dp_replicate"] * self.dp_shard + c["dp_shard"]


def resolve_layout(cfg: ParallelConfig, world_size: int, model: ModelConfig | None = None) -> Layout:
    """Fill the -1 dimension, then check the layout against the world size and, given the model, its shape."""
    if cfg.backend == "deepspeed":
        if (cfg.tp, cfg.pp) != (1, 1):
            raise ConfigError(f"parallel.backend=deepspeed shards data-parallel only (ZeRO-3); parallel.tp={cfg.tp} "
                              f"and parallel.pp={cfg.pp} must be 1")
        return Layout(world_size=world_size, dp_shard=world_size)
    tp, pp = cfg.tp, cfg.pp
    rep, shard = cfg.dp_replicate, cfg.dp_shard
    if rep == -1 and shard == -1:
        rep = 1
    fixed = tp * pp * (rep if rep != -1 else 1) * (shard if shard != -1 else 1)
    named = (f"pp={pp} x dp_replicate={cfg.dp_replicate} x dp_shard={cfg.dp_shard} x tp={tp}")
    if world_size % fixed:
        raise ConfigError(f"parallel layout {named} does not divide the world size {world_size} "
                          f"({world_size} is not a multiple of {fixed})")
    if rep == -1:
        rep = world_size // fixed
    elif shard == -1:
        shard = world_size // fixed
    elif fixed != world_size:
        raise ConfigError(f"parallel layout {named} = {fixed} ranks, but the world size is {world_size}; "
                          "set one of dp_replicate / dp_shard to -1 to fill it")
    layout = Layout(world_size=world_size, pp=pp, dp_replicate=rep, dp_shard=shard, tp=tp,
                    stages_per_rank=cfg.stages_per_rank if pp > 1 else 1)
    if pp == 1 and cfg.pp_schedule == "interleaved_1f1b" and cfg.pp_stages_per_rank:
        raise ConfigError("parallel.pp_stages_per_rank is set but parallel.pp=1 (no pipeline)")
    if model is not None:
        check_model_fits(layout, cfg, model)
    return layout


def check_model_fits(layout: Layout, cfg: ParallelConfig, model: ModelConfig) -> None:
    tp = layout.tp
    if tp > 1:
        for name, value in (("n_heads", model.n_heads), ("n_kv_heads", model.kv_heads), ("ffn_dim", model.ffn_dim)):
            if value % tp:
                raise ConfigError(f"parallel.tp={tp} does not divide model.{name}={value}: tensor parallelism "
                                  f"splits the {name.removeprefix('n_').replace('_', ' ')} evenly over the tp ranks")
    if layout.pp > 1:
        if model.tie_embeddings:
            raise ConfigError(f"model.tie_embeddings with parallel.pp={layout.pp} is not supported: the embedding "
                              "(first stage) and the output projection (last stage) would be two copies on "
                              "different ranks")
        split_layers(model.n_layers, layout.n_stages, cfg.pp_split_points)  # raises with the numbers
        if cfg.pp_microbatches is not None and cfg.pp_microbatches < layout.pp and cfg.pp_schedule != "gpipe":
            raise ConfigError(f"parallel.pp_microbatches={cfg.pp_microbatches} is fewer than the pp={layout.pp} "
                              f"stages; {cfg.pp_schedule} needs at least one micro-batch per stage")


def split_layers(n_layers: int, n_stages: int, split_points: list[int] | None = None) -> list[range]:
    """The layer indices of each pipeline stage: split_points[i] is the first layer of stage i + 1."""
    if n_stages > n_layers:
        raise ConfigError(f"pipeline with {n_stages} stages but the model has only n_layers={n_layers}: every stage "
                          "needs at least one layer (lower parallel.pp or parallel.pp_stages_per_rank)")
    if split_points is None:
        base, extra = divmod(n_layers, n_stages)
        sizes = [base + (1 if s < extra else 0) for s in range(n_stages)]
        bounds = [0]
        for size in sizes:
            bounds.append(bounds[-1] + size)
    else:
        if len(split_points) != n_stages - 1:
            raise ConfigError(f"parallel.pp_split_points has {len(split_points)} entries; {n_stages} stages need "
                              f"{n_stages - 1} (the first layer of every stage after the first)")
        if split_points and split_points[-1] >= n_layers:
            raise ConfigError(f"parallel.pp_split_points={split_points} reaches beyond n_layers={n_layers}: the "
                              "last stage would have no layer")
        bounds = [0, *split_points, n_layers]
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]
