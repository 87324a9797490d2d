"""`forgeline pretrain CONFIG.yaml`: next-token pre-training on token shards (recipes/pretrain.py)."""

from __future__ import annotations

from .training import add_training_command


def register(sub) -> None:
    from ...config import PretrainConfig

    add_training_command(sub, "pretrain", help="pre-train a model on token shards", schema=PretrainConfig,
                         example="train.lr=3e-4", run=run, check=check)


def run(cfg, resume):
    from ...recipes import pretrain as recipe  # looked up at call time, so tests can stand in for the recipe

    return recipe.pretrain(cfg, resume=resume)


def check(cfg, nproc: int) -> None:
    from ...data import load_index
    from ...recipes.setup import check_parallel_config

    check_parallel_config(cfg, nproc, stage="pretrain")
    load_index(cfg.data.dataset)
