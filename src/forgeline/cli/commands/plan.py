"""`forgeline plan memory`: per-rank memory of a model under a parallel layout, before renting the machines."""

from __future__ import annotations

import json

from ..args import add_config_args, split_config_and_overrides


def register(sub) -> None:
    from ...config import PretrainConfig

    plan = sub.add_parser("plan", help="planning commands").add_subparsers(dest="action", required=True)
    p = plan.add_parser("memory", help="per-rank memory of a model preset under a parallel layout")
    add_config_args(p, PretrainConfig, "parallel.tp=8", sections=("model", "data", "train", "parallel"),
                    what=" (the pretrain config's model, data, train, parallel sections)")
    p.add_argument("--world", type=int, required=True, help="total ranks (GPUs)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=plan_memory)


def plan_memory(args) -> int:
    from ...config import PretrainConfig, load_config, read_yaml
    from ...parallel.memory import GIB, estimate_memory

    config, overrides = split_config_and_overrides(args.items)
    data = read_yaml(config) if config is not None else {}
    if "dataset" not in data.get("data", {}) and not any(o.startswith("data.dataset=") for o in overrides):
        overrides = [*overrides, "data.dataset=unused"]  # planning reads no data
    cfg = load_config(PretrainConfig, config, overrides)
    est = estimate_memory(cfg, args.world)
    if args.json:
        print(json.dumps(est.as_dict(), indent=1))
        return 0
    m = cfg.model
    print(f"{m.preset or 'custom'} model, {cfg.train.micro_batch_size} x {cfg.seq_len()} tokens per micro-batch, "
          f"{cfg.train.precision}, activation checkpointing {'on' if cfg.train.activation_checkpointing else 'off'}")
    print(f"layout: {est.layout}; worst-off rank: pipeline stage {est.stage}")
    rows = [("parameters (fp32 master)", est.params_bytes), ("gradients (fp32)", est.grads_bytes),
            ("optimizer (AdamW, fp32)", est.optimizer_bytes), ("gathered params/grads (FSDP2)", est.gathered_bytes),
            ("activations", est.activation_bytes), ("total per rank", est.total_bytes)]
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"  {name:<{width}}  {value / GIB:10.2f} GiB")
    print("  (+10-20% for allocator fragmentation, communication buffers and workspaces)")
    return 0
