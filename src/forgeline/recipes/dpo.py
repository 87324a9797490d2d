"""`forgeline dpo`: preference tuning without a reward model. DPO (`loss_type` sigmoid, with label smoothing for
conservative DPO), IPO, hinge (SLiC), and SimPO (reference-free) on pairs of a prompt with a chosen and a rejected
response. The reference is the base with adapters off (LoRA/QLoRA), or its log-probs cached once before training
(full fine-tuning): the model is never loaded twice where it need not be (recipes/preference.py).
"""

from __future__ import annotations

from ..config import DPOConfig
from ..objectives.preference import DPOObjective, cached_reference
from .preference import PreferenceOutcome, load_split, pad_id, place_and_load, reference_for, starting_model, train
from .setup import Run, run_stage


def dpo(cfg: DPOConfig, *, resume: bool | str = False, export: bool = True) -> PreferenceOutcome:
    return run_stage(cfg, resume, lambda run: _dpo(run, cfg, export), pipeline_ok=False, deepspeed_ok=False,
                     stage="dpo")


def _dpo(run: Run, cfg: DPOConfig, export: bool) -> PreferenceOutcome:
    model, tokenizer, template = starting_model(run, cfg, "dpo")
    data = load_split(run, cfg, template, kind="pairs")
    loaders = place_and_load(run, cfg, model, tokenizer, data, pad_id(tokenizer))
    settings = cfg.dpo
    reference = None if settings.loss_type == "simpo" else reference_for(run, cfg, settings, loaders)
    objective = DPOObjective(beta=settings.beta, loss_type=settings.loss_type,
                             label_smoothing=settings.label_smoothing, simpo_gamma=settings.simpo_gamma,
                             reference=reference)
    result, model_dir = train(run, cfg, objective, loaders, export=export, generation_eos=[template.end_of_turn],
                             extra_forward=reference not in (None, cached_reference))
    return PreferenceOutcome(result=result, model_dir=model_dir, data_stats=data.stats)

