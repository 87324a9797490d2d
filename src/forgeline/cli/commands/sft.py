"""`forgeline sft CONFIG.yaml`: supervised fine-tuning on instruction or chat data (recipes/sft.py)."""

from __future__ import annotations

from .training import add_training_command


def register(sub) -> None:
    from ...config import SFTConfig

    add_training_command(sub, "sft", help="supervised fine-tuning on instruction or chat records (init: a model)",
                         schema=SFTConfig, example="data.train=[alpaca.json]", run=run, check=check)


def run(cfg, resume):
    from ...recipes import sft as recipe

    return recipe.sft(cfg, resume=resume)


def check(cfg, nproc: int) -> None:
    from ...data.sources import resolve_inputs
    from ...recipes.setup import check_parallel_config

    check_parallel_config(cfg, nproc, pipeline_ok=False, deepspeed_ok=False, stage="sft")
    resolve_inputs(cfg.data.train)
    if cfg.data.validation:
        resolve_inputs(cfg.data.validation)
