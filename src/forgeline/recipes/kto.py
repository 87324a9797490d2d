"""`forgeline kto`: alignment from unpaired feedback (a prompt, a completion, and whether it is desirable), against
a reference model: the base with adapters off, or its log-probs cached once (recipes/preference.py)."""

from __future__ import annotations

from ..config import KTOConfig
from ..objectives.preference import KTOObjective, cached_reference
from .preference import PreferenceOutcome, load_split, pad_id, place_and_load, reference_for, starting_model, train
from .setup import Run, run_stage


def kto(cfg: KTOConfig, *, resume: bool | str = False, export: bool = True) -> PreferenceOutcome:
    return run_stage(cfg, resume, lambda run: _kto(run, cfg, export), pipeline_ok=False, deepspeed_ok=False,
                     stage="kto")


def _kto(run: Run, cfg: KTOConfig, export: bool) -> PreferenceOutcome:
    model, tokenizer, template = starting_model(run, cfg, "kto")
    data = load_split(run, cfg, template, kind="unpaired")
    loaders = place_and_load(run, cfg, model, tokenizer, data, pad_id(tokenizer))
    settings = cfg.kto
    reference = reference_for(run, cfg, settings, loaders)
    objective = KTOObjective(beta=settings.beta, desirable_weight=settings.desirable_weight,
                             undesirable_weight=settings.undesirable_weight, reference=reference)
    result, model_dir = train(run, cfg, objective, loaders, export=export, generation_eos=[template.end_of_turn],
                             extra_forward=reference is not cached_reference)
    return PreferenceOutcome(result=result, model_dir=model_dir, data_stats=data.stats)
