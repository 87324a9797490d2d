"""Writes small real sharded (DCP) checkpoints: 2 gloo processes, FSDP2 over both, one AdamW step, saved with
forgeline's own ShardedCheckpointer; rank 0 also writes the gathered whole weights as the reference.

    python tests/sharded_checkpoint_writer.py SPEC.json

SPEC.json: {"root": DIR, "tokenizer": DIR or null, "runs": {NAME: MODEL_CONFIG, ...}}. For each run,
DIR/NAME/checkpoints/step_00000001 is the sharded checkpoint (its config.yaml holds the model config and the
tokenizer dir) and DIR/NAME/reference.safetensors the whole model's weights. Rank 0 runs in this process and rank 1
in one spawned process: one interpreter start-up less than torchrun on a 2-core machine (about 5 s in all).
"""

from __future__ import annotations

import json
import os
import sys
from datetime import timedelta
from pathlib import Path

WORLD = 2


def worker(rank: int, spec: dict, init_file: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch
    import torch.distributed as dist
    import yaml
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from forgeline.model import ModelConfig, build_model
    from forgeline.parallel.apply import apply_fsdp
    from forgeline.parallel.checkpoint import ShardedCheckpointer
    from forgeline.train.distributed import DistInfo

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=120))
    try:
        mesh = init_device_mesh("cpu", (WORLD,))
        for name, model_cfg in spec["runs"].items():
            torch.manual_seed(0)
            model = build_model(ModelConfig.model_validate(model_cfg))
            with torch.no_grad():  # no weight trivially 1 or 0 (norms included)
                for p in model.parameters():
                    p.add_(torch.randn_like(p) * 0.05)
            apply_fsdp([model], mesh, reshard_after_forward=True, mp_policy=MixedPrecisionPolicy())
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
            tokens = torch.randint(0, model_cfg["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(rank))
            model(tokens).float().pow(2).mean().backward()
            optimizer.step()  # ranks see different data: the shards differ from the initial weights
            full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            run_dir = Path(spec["root"]) / name
            run_cfg = {"model": model_cfg, **({"tokenizer": spec["tokenizer"]} if spec.get("tokenizer") else {})}
            ShardedCheckpointer("FSDP2 x2 (test)").save(
                run_dir / "checkpoints", 1, model=model, optimizer=optimizer, trainer_state={"tokens_seen": 32},
                config_yaml=yaml.safe_dump(run_cfg), keep_last=1, dist=DistInfo(rank=rank, world_size=WORLD))
            if rank == 0:
                save_file({k: v.contiguous() for k, v in full.items()}, str(run_dir / "reference.safetensors"))
    finally:
        dist.destroy_process_group()


def main() -> None:
    import multiprocessing
    import tempfile

    spec = json.loads(Path(sys.argv[1]).read_text())
    with tempfile.TemporaryDirectory() as tmp:
        args = (spec, os.path.join(tmp, "init"))
        child = multiprocessing.get_context("spawn").Process(target=worker, args=(1, *args), daemon=True)
        child.start()
        try:
            worker(0, *args)
        finally:
            child.join(timeout=120)
        if child.exitcode != 0:
            sys.exit(f"rank 1 failed (exit code {child.exitcode})")


if __name__ == "__main__":
    main()
