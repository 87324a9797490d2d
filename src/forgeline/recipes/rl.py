"""`forgeline grpo` and `forgeline rloo`: online RL with verifiable or programmatic rewards, in the one loop.

    model  = init, with adapters when peft: is set
    source = rollouts of the model being trained (rl/rollout.py): prompts -> group of samples -> rewards ->
             advantages within each group -> micro-batches
    loss   = objectives/policy_gradient.py: GRPO's clipped per-token surrogate (+ beta x per-token KL to the
             reference), or RLOO's clipped per-sequence one (its KL penalty taken off the reward)

The reference (when beta > 0) is the base with its adapters switched off under peft (no second copy), else a
frozen copy of `init` (or of `reference_model`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..config import GRPOConfig, OnlineRLStageConfig, RLOOConfig
from ..data.chat_templates import load_chat_template
from ..data.prompts import load_prompts
from ..errors import ConfigError
from ..model import training_flops_per_token
from ..model.inference.generate import default_stop_ids
from ..objectives.policy_gradient import PolicyGradientObjective, rollout_logps
from ..rl.rewards import build_reward
from ..rl.rollout import RolloutSettings, RolloutSource
from ..train.distributed import unwrap
from ..train.trainer import TrainResult
from .preference import pad_id
from .setup import Run, model_to_tune, run_stage


@dataclass
class RLOutcome:
    result: TrainResult
    model_dir: Path | None


def grpo(cfg: GRPOConfig, *, resume: bool | str = False, export: bool = True) -> RLOutcome:
    return run_stage(cfg, resume, lambda run: _online_rl(run, cfg, export), pipeline_ok=False, deepspeed_ok=False,
                     stage="grpo")


def rloo(cfg: RLOOConfig, *, resume: bool | str = False, export: bool = True) -> RLOutcome:
    return run_stage(cfg, resume, lambda run: _online_rl(run, cfg, export), pipeline_ok=False, deepspeed_ok=False,
                     stage="rloo")


def _online_rl(run: Run, cfg: OnlineRLStageConfig, export: bool) -> RLOutcome:
    check_rl_layout(cfg, run.layout)
    model, tokenizer = model_to_tune(cfg, run.dist.device, cfg.stage)
    template = None
    if cfg.data.template != "none":
        template = load_chat_template(tokenizer, cfg.data.template)
        tokenizer.chat_template = template.source
    prompts = load_prompts(cfg.data.train, tokenizer, prompt_format=cfg.data.prompt_format, template=template,
                           max_prompt_length=cfg.data.max_prompt_length)
    reward = build_reward([r.model_dump() for r in cfg.rewards])
    settings, objective, beta = _algorithm(cfg)
    if template is not None:  # a chat model's reply ends at its end of turn
        settings.stop_token_ids = tuple(sorted(default_stop_ids(tokenizer) | {template.end_of_turn_id}))
    rows = cfg.rollout.prompts_per_step // run.dp_size * cfg.rollout.samples_per_prompt
    run.place(model, tokenizer, grad_accum=max(1, -(-rows // cfg.train.micro_batch_size)))
    reference = _reference(run, cfg, beta)
    source = RolloutSource(run.wrapped, tokenizer, prompts, _scorer(reward), settings, reference=reference,
                           micro_batch_size=cfg.train.micro_batch_size, dp_rank=run.dp_rank, dp_size=run.dp_size,
                           seed=cfg.seed, pad_id=pad_id(tokenizer), device=run.dist.device,
                           precision=cfg.train.precision, shuffle=cfg.data.shuffle, log=run.print)
    run.print(f"{cfg.stage}: {len(prompts):,} prompts | {cfg.rollout.prompts_per_step} per step x "
              f"{cfg.rollout.samples_per_prompt} samples, up to {cfg.rollout.max_new_tokens} new tokens | rewards "
              f"{', '.join(f'{r.name} x {r.weight:g}' for r in cfg.rewards)} | {source.grad_accum_steps} "
              f"micro-batch(es) of {cfg.train.micro_batch_size} per step")
    flops = training_flops_per_token(run.model.cfg, cfg.seq_len())
    trainer = run.trainer(loss_fn=objective, loader=source, train_cfg=cfg.train, grad_accum=source.grad_accum_steps,
                          flops_per_token=flops)
    result = trainer.fit(resume_from=run.resume_from)
    eos = [template.end_of_turn] if template is not None else None
    return RLOutcome(result=result, model_dir=run.finish(trainer, result, export=export, generation_eos=eos))


def check_rl_layout(cfg: OnlineRLStageConfig, layout) -> None:
    """One process, DDP, or FSDP2 with full fine-tuning: each rank samples its share with the whole model (under
    FSDP2 a copy refreshed every batch). Tensor and pipeline layouts split the model each sampling step needs."""
    sharded = not (layout.is_plain_data_parallel and cfg.parallel.backend == "native")
    if layout.tp > 1 or layout.pp > 1 or cfg.parallel.backend != "native":
        raise ConfigError(f"{cfg.stage} generates its rollouts with the whole model on every rank: one process, DDP "
                          f"or FSDP2 (parallel.dp_shard), not {layout.describe()}"
                          + (" with parallel.backend=deepspeed" if cfg.parallel.backend != "native" else ""))
    if sharded and cfg.peft is not None:
        raise ConfigError(f"{cfg.stage} with peft: runs in one process or under DDP; under FSDP2 train every weight "
                          "(adapters on a sharded base cannot be copied whole for sampling yet)")


def _scorer(reward):
    """The rollout source's view of a CombinedReward: totals and parts, or the reason the batch failed."""
    def score(prompts, completions, records):
        result = reward.score(prompts, completions, records)
        return (result.total if result.ok else None), result.parts, (None if result.ok else result.reason)
    return score


def _algorithm(cfg: OnlineRLStageConfig) -> tuple[RolloutSettings, PolicyGradientObjective, float]:
    r = cfg.rollout
    common = dict(prompts_per_step=r.prompts_per_step, group_size=r.samples_per_prompt,
                  max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                  stop=tuple(r.stop), ignore_eos=r.ignore_eos, epochs=r.epochs)
    if isinstance(cfg, GRPOConfig):
        g = cfg.grpo
        high = g.epsilon_high if g.epsilon_high is not None else g.epsilon
        settings = RolloutSettings(**common, estimator="group", scale=g.scale_rewards, averaging=g.loss_averaging)
        return settings, PolicyGradientObjective(epsilon_low=g.epsilon, epsilon_high=high, beta=g.beta,
                                                 level="token", averaging=g.loss_averaging), g.beta
    if isinstance(cfg, RLOOConfig):
        o = cfg.rloo
        high = o.epsilon_high if o.epsilon_high is not None else o.epsilon
        settings = RolloutSettings(**common, estimator="rloo", normalize=o.normalize_advantages,
                                   reward_kl_beta=o.beta, averaging="sequence")
        return settings, PolicyGradientObjective(epsilon_low=o.epsilon, epsilon_high=high, beta=0.0,
                                                 level="sequence", averaging="sequence"), o.beta
    raise ConfigError(f"no online RL algorithm for {type(cfg).__name__}")


def _reference(run: Run, cfg: OnlineRLStageConfig, beta: float):
    """(policy, batch) -> the reference's per-token log-probs, or None when beta is 0."""
    if beta == 0:
        return None
    settings = cfg.grpo if isinstance(cfg, GRPOConfig) else cfg.rloo
    if cfg.peft is not None and settings.reference_model is None:
        from ..peft.apply import adapters_disabled

        run.print("reference: the base model with the adapters switched off (no second copy)")

        def base(policy, batch):
            with adapters_disabled(unwrap(policy)):
                return rollout_logps(unwrap(policy), batch)
        return base
    source = settings.reference_model or cfg.init
    if source is None:
        raise ConfigError(f"{cfg.stage}: beta > 0 needs a reference: set init (the starting policy) or "
                          f"{cfg.stage}.reference_model")
    frozen = run.frozen(source)
    run.print(f"reference: {source}, a frozen copy")
    return lambda policy, batch: rollout_logps(frozen, batch)
