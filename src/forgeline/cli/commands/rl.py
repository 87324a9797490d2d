"""The online RL stages: `forgeline grpo CONFIG.yaml` and `forgeline rloo CONFIG.yaml` (recipes/rl.py)."""

from __future__ import annotations

from .training import add_training_command

EXAMPLE = "data.train=[prompts.jsonl] rewards=[arithmetic] init=runs/sft/model"


def register(sub) -> None:
    from ...config import GRPOConfig, RLOOConfig

    for name, schema, what in (
            ("grpo", GRPOConfig, "GRPO: group-relative advantages over samples of each prompt, with verifiable or "
                                 "programmatic rewards"),
            ("rloo", RLOOConfig, "RLOO: REINFORCE with a leave-one-out baseline over samples of each prompt")):
        add_training_command(sub, name, help=what, schema=schema, example=EXAMPLE, run=_runner(name),
                             check=_check(name))


def _runner(stage: str):
    def run(cfg, resume):
        from ...recipes import rl

        return getattr(rl, stage)(cfg, resume=resume)
    return run


def _check(stage: str):
    def check(cfg, nproc: int) -> None:
        from ...data.sources import resolve_inputs
        from ...recipes.rl import check_rl_layout
        from ...recipes.setup import check_parallel_config
        from ...rl.rewards import build_reward

        layout = check_parallel_config(cfg, nproc, pipeline_ok=False, deepspeed_ok=False, stage=stage)
        check_rl_layout(cfg, layout)
        resolve_inputs(cfg.data.train)
        build_reward([r.model_dump() for r in cfg.rewards])  # an unknown reward fails here, before any process
    return check
