"""`forgeline orpo`: supervised fine-tuning and preference alignment in one loss, with no reference model: the
chosen response's NLL plus beta x the odds-ratio term -log sigmoid(log odds(chosen) - log odds(rejected))."""

from __future__ import annotations

from ..config import ORPOConfig
from ..objectives.preference import ORPOObjective
from .preference import PreferenceOutcome, load_split, pad_id, place_and_load, starting_model, train
from .setup import Run, run_stage


def orpo(cfg: ORPOConfig, *, resume: bool | str = False, export: bool = True) -> PreferenceOutcome:
    return run_stage(cfg, resume, lambda run: _orpo(run, cfg, export), pipeline_ok=False, deepspeed_ok=False,
                     stage="orpo")


def _orpo(run: Run, cfg: ORPOConfig, export: bool) -> PreferenceOutcome:
    model, tokenizer, template = starting_model(run, cfg, "orpo")
    data = load_split(run, cfg, template, kind="pairs")
    loaders = place_and_load(run, cfg, model, tokenizer, data, pad_id(tokenizer))
    result, model_dir = train(run, cfg, ORPOObjective(beta=cfg.orpo.beta), loaders, export=export,
                             generation_eos=[template.end_of_turn])
    return PreferenceOutcome(result=result, model_dir=model_dir, data_stats=data.stats)
