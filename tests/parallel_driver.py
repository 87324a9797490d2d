"""Runs several `forgeline pretrain` configurations inside ONE torchrun launch (one process group), one after another.

    python -m torch.distributed.run --nproc_per_node N tests/parallel_driver.py SPEC.json

SPEC.json: {"config": BASE.yaml, "runs": [{"name", "overrides": [...], "resume_from": NAME or null,
"damage_latest": bool, "spike_at": micro-batch index or null}, ...], "root": DIR}. Each run writes DIR/NAME like a
normal run; a run with `resume_from` starts from a copy of that run's directory with its last checkpoint removed (with
`damage_latest`: kept, but its largest file cut in half) and continues with --resume. Starting torchrun once for many layouts saves its ~5 s start-up per layout on the 2-core CI machine.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from pathlib import Path

import torch

import forgeline.recipes.pretrain as pretrain_module
from forgeline.recipes.setup import run_in_group
from forgeline.config import PretrainConfig, load_config
from forgeline.objectives import causal_lm_loss
from forgeline.train.distributed import barrier, init_distributed, shutdown


def spiking_loss(spike_at: int):
    """causal_lm_loss, times 10 on the `spike_at`-th call (the same micro-batch index on every rank)."""
    calls = {"n": 0}

    def loss_fn(model, batch):
        out = causal_lm_loss(model, batch)
        if calls["n"] == spike_at:
            out = dataclasses.replace(out, loss=out.loss * 10.0)
        calls["n"] += 1
        return out

    return loss_fn


def prepare_resume(root: Path, name: str, source: str, damage_latest: bool = False) -> None:
    target = root / name
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(root / source, target)
    checkpoints = sorted((target / "checkpoints").glob("step_*"))
    if damage_latest:  # --resume must find the damage and continue from the one before
        largest = max((p for p in checkpoints[-1].rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
        largest.write_bytes(largest.read_bytes()[: largest.stat().st_size // 2])
    else:
        shutil.rmtree(checkpoints[-1])  # continue from the one before the end
    shutil.rmtree(target / "model", ignore_errors=True)


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    root = Path(spec["root"])
    dist = init_distributed("cpu")
    try:
        for run in spec["runs"]:
            if run.get("resume_from") and dist.is_main:
                prepare_resume(root, run["name"], run["resume_from"], bool(run.get("damage_latest")))
            barrier()
            cfg = load_config(PretrainConfig, spec["config"], [f"run_dir={root / run['name']}", *run["overrides"]])
            pretrain_module.causal_lm_loss = (spiking_loss(run["spike_at"]) if run.get("spike_at") is not None
                                              else causal_lm_loss)
            torch.manual_seed(0)
            run_in_group(dist, cfg, bool(run.get("resume_from")), lambda r: pretrain_module._pretrain(r, cfg))
            barrier()
    finally:
        pretrain_module.causal_lm_loss = causal_lm_loss
        shutdown()


if __name__ == "__main__":
    main()
