"""`forgeline rm`: a reward model from preference pairs. The decoder gets a scalar head that reads the last non-pad
token (model/heads.py), trained with the Bradley-Terry loss -log sigmoid(r_chosen - r_rejected - margin), plus an
optional reward-centering term; full, LoRA or QLoRA. The result is a whole model directory (with adapters: merged
into it), which `forgeline export hf` writes as a transformers `LlamaForSequenceClassification` and which PPO and
`forgeline rm score` read.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import RewardConfig
from ..model.formats.model_dir import save_model_dir
from ..model.heads import to_reward_model
from ..objectives.preference import RewardObjective
from ..train.distributed import barrier, unwrap
from .preference import PreferenceOutcome, load_split, pad_id, place_and_load, starting_model, train
from .setup import Run, initial_model, run_stage, full_trainable_state


def rm(cfg: RewardConfig, *, resume: bool | str = False, export: bool = True) -> PreferenceOutcome:
    return run_stage(cfg, resume, lambda run: _rm(run, cfg, export), pipeline_ok=False, deepspeed_ok=False,
                     stage="rm")


def reward_model_from(model, tokenizer):
    """A language model gets its scalar head (a reward model given as init keeps its own); padding is the
    tokenizer's pad, which the head's pooling skips, as transformers' does with the exported pad_token_id."""
    if model.cfg.head != "score":
        to_reward_model(model, pad_token_id=pad_id(tokenizer))
    return model


def _rm(run: Run, cfg: RewardConfig, export: bool) -> PreferenceOutcome:
    model, tokenizer, template = starting_model(run, cfg, "rm")
    model = reward_model_from(model, tokenizer)
    data = load_split(run, cfg, template, kind="pairs")
    loaders = place_and_load(run, cfg, model, tokenizer, data, model.cfg.pad_token_id,
                             branched=cfg.reward.share_prompt)
    objective = RewardObjective(center_coef=cfg.reward.center_coef, use_margin=cfg.reward.use_margin)
    result, model_dir = train(run, cfg, objective, loaders, export=export and cfg.peft is None, generation_eos=None)
    if export and cfg.peft is not None and result.preempted is None:
        model_dir = _save_merged(run, cfg)
    return PreferenceOutcome(result=result, model_dir=model_dir, data_stats=data.stats)


def _save_merged(run: Run, cfg: RewardConfig) -> Path:
    """run_dir/model: the adapters merged into the base, with the trained head: a reward model is consumed whole
    (PPO, scoring, transformers), never as an adapter."""
    from ..peft.apply import apply_peft, merge_adapters

    out = run.run_dir / "model"
    state = full_trainable_state(run)
    if run.dist.is_main:
        model = unwrap(run.wrapped)
        if not run.whole_model:  # the sharded model cannot be merged in place: a whole copy on rank 0
            model, _ = initial_model(cfg, torch.device("cpu"))
            model = reward_model_from(model, run.tokenizer)
            apply_peft(model, cfg.peft, precision=cfg.train.precision, fingerprint=run.peft.base_sha256)
            model.load_state_dict(state, strict=False)
        merge_adapters(model)
        save_model_dir(model.float(), run.tokenizer, out, overwrite=True)
        print(f"reward model (adapters merged) written to {out}", flush=True)
    barrier()
    return out


def score_file(model_path: str | Path, input_path: str | Path, *, out: str | Path | None = None,
               data_format: str = "auto", template: str = "auto", max_length: int = 1024,
               batch_size: int = 8) -> str:
    """`forgeline rm score`: every pair's chosen and rejected reward under a reward model, rendered with its chat
    template as in training; returns the summary (pairwise accuracy with its Wilson 95% interval, mean margin) and
    writes per-pair rewards to `out` (JSONL) when given."""
    import json

    from ..data.chat_templates import load_chat_template
    from ..data.preference import load_preference_data
    from ..errors import ConfigError
    from ..files import atomic_write_text
    from ..model.formats import load_model
    from ..model.inference.reward import score_sequences
    from ..stats import wilson_interval

    loaded = load_model(model_path, dtype=torch.float32)
    model = loaded.model
    if model.cfg.head != "score":
        raise ConfigError(f"{model_path} is a language model, not a reward model (train one with forgeline rm)")
    if loaded.tokenizer is None:
        raise ConfigError(f"{model_path} has no tokenizer beside it")
    chat = load_chat_template(loaded.tokenizer, template)
    pairs, stats = load_preference_data([Path(input_path)], chat, max_length=max_length, max_prompt_length=None,
                                        format=data_format, kind="pairs")
    sequences = [p.chosen.input_ids.tolist() for p in pairs] + [p.rejected.input_ids.tolist() for p in pairs]
    rewards = score_sequences(model, sequences, pad_token_id=model.cfg.pad_token_id, batch_size=batch_size)
    chosen, rejected = rewards[:len(pairs)], rewards[len(pairs):]
    correct = int((chosen > rejected).sum())
    low, high = wilson_interval(correct, len(pairs))
    if out is not None:
        lines = [json.dumps({"pair": i, "reward_chosen": float(c), "reward_rejected": float(r)})
                 for i, (c, r) in enumerate(zip(chosen.tolist(), rejected.tolist()))]
        atomic_write_text(Path(out), "\n".join(lines) + "\n")
    return (f"{len(pairs)} pairs ({stats.summary()}): accuracy {correct / len(pairs):.4f} "
            f"(95% CI [{low:.4f}, {high:.4f}]), mean margin {float((chosen - rejected).mean()):.4f}, "
            f"mean chosen reward {float(chosen.mean()):.4f}, rejected {float(rejected.mean()):.4f}"
            + (f"; rewards written to {out}" if out is not None else ""))
