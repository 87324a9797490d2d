"""Preference objectives: the reward model's Bradley-Terry loss, DPO and its variants (IPO, hinge, SimPO), ORPO and
KTO, each a `(model, batch) -> LossOutput` on the batches of `data.preference_batches` (chosen rows, then rejected
rows; or completions, then their mismatched KL rows).

Each sums its per-pair (per-example) losses, weighted by the batch's `weight` (0 for an evaluation pass's filler
rows), and counts pairs (`n_pairs`) or examples (`n_examples`), so the loop averages over the pairs of the whole
optimizer step. The formulas are in `preference_losses.py` (tested against TRL's); this module only runs the model:
one forward over all rows for the policy's response log-probs, from the final hidden states and the LM head,
chunk by chunk (`kernels.logprobs`: the logits never exist in full).

The reference model is a callable `(model, batch) -> log-probs of every row` (no gradient):
    cached_reference        the log-probs the recipe computed once before training (`ref_logps` in the batch)
    adapters_off_reference  the trained model with its adapters switched off: the frozen base, no second copy
    FrozenReference(model)  a separate frozen model (`Run.frozen`), when neither applies
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from ..kernels.cross_entropy import IGNORE_INDEX
from ..kernels.logprobs import token_logprobs
from ..train.distributed import unwrap
from ..train.executor import LossOutput, batch_tokens
from .preference_losses import (bradley_terry_losses, dpo_losses, kto_kl, kto_losses, orpo_losses,
                                simpo_losses)

Reference = Callable[[nn.Module, dict[str, Any]], torch.Tensor]


def response_logps(model: nn.Module, input_ids: torch.Tensor, targets: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log p(response tokens) per row and the number of response tokens per row (right-padded rows)."""
    hidden = model(input_ids, return_hidden=True)
    per_token = token_logprobs(hidden, unwrap(model).lm_head_weight(), targets)
    return per_token.sum(dim=-1), (targets != IGNORE_INDEX).sum(dim=-1)


def cached_reference(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    if "ref_logps" not in batch:
        raise RuntimeError("the batch carries no cached reference log-probs (the loader's reference is not set)")
    return batch["ref_logps"].float()


@torch.no_grad()
def adapters_off_reference(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    from ..peft.apply import adapters_disabled

    # the unwrapped module: a no-gradient pass needs none of DDP's bookkeeping (FSDP2's hooks sit on the module)
    inner = unwrap(model)
    with adapters_disabled(inner):
        return response_logps(inner, batch["input_ids"], batch["targets"])[0]


@dataclass
class FrozenReference:
    model: nn.Module

    @torch.no_grad()
    def __call__(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        return response_logps(self.model, batch["input_ids"], batch["targets"])[0]


def _weighted(values: dict[str, torch.Tensor], weight: torch.Tensor) -> dict[str, float]:
    return {name: float((v.detach().float() * weight).sum()) for name, v in values.items()}


def _pair_metrics(chosen_rewards, rejected_rewards, chosen_logps, rejected_logps, weight) -> dict[str, float]:
    return _weighted({
        "reward_chosen": chosen_rewards, "reward_rejected": rejected_rewards,
        "reward_accuracy": (chosen_rewards > rejected_rewards).float(),
        "reward_margin": chosen_rewards - rejected_rewards,
        "logp_chosen": chosen_logps, "logp_rejected": rejected_logps,
    }, weight)


@dataclass
class DPOObjective:
    """DPO with loss_type sigmoid (label_smoothing: conservative DPO), ipo or hinge against a reference, or SimPO
    (reference-free, length-normalised, target margin gamma)."""

    beta: float
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    reference: Reference | None = None
    count_key = "n_pairs"

    def __call__(self, model: nn.Module, batch: dict[str, Any]) -> LossOutput:
        ref = None
        if self.loss_type != "simpo":
            if self.reference is None:
                raise RuntimeError(f"DPO loss_type={self.loss_type} needs a reference")
            # first: the reference pass's activations are freed before the policy's are kept for the backward
            ref = self.reference(model, batch)
        logps, lengths = response_logps(model, batch["input_ids"], batch["targets"])
        B = batch["weight"].shape[0]
        chosen, rejected, chosen_len, rejected_len = logps[:B], logps[B:], lengths[:B], lengths[B:]
        if self.loss_type == "simpo":
            losses, chosen_rewards, rejected_rewards = simpo_losses(
                chosen, rejected, chosen_len, rejected_len, beta=self.beta, gamma=self.simpo_gamma,
                label_smoothing=self.label_smoothing)
        else:
            losses, chosen_rewards, rejected_rewards = dpo_losses(
                chosen, rejected, ref[:B], ref[B:], beta=self.beta, loss_type=self.loss_type,
                label_smoothing=self.label_smoothing, chosen_len=chosen_len, rejected_len=rejected_len)
        weight = batch["weight"].to(losses.device)
        return LossOutput(loss=(losses * weight).sum(), count=int(batch["n_pairs"]), tokens=batch_tokens(batch),
                          metrics=_pair_metrics(chosen_rewards, rejected_rewards, chosen, rejected, weight))


@dataclass
class ORPOObjective:
    """ORPO: the chosen response's NLL (mean over its tokens) plus beta x the odds-ratio term; no reference."""

    beta: float
    count_key = "n_pairs"

    def __call__(self, model: nn.Module, batch: dict[str, Any]) -> LossOutput:
        logps, lengths = response_logps(model, batch["input_ids"], batch["targets"])
        B = batch["weight"].shape[0]
        chosen, rejected, chosen_len, rejected_len = logps[:B], logps[B:], lengths[:B], lengths[B:]
        odds_losses, log_odds, chosen_rewards, rejected_rewards = orpo_losses(
            chosen, rejected, chosen_len, rejected_len, beta=self.beta)
        nll = -chosen / chosen_len.clamp(min=1)
        weight = batch["weight"].to(nll.device)
        metrics = _pair_metrics(chosen_rewards, rejected_rewards, chosen, rejected, weight)
        metrics.update(_weighted({"nll": nll, "log_odds_ratio": log_odds, "odds_ratio_loss": odds_losses}, weight))
        return LossOutput(loss=((nll + odds_losses) * weight).sum(), count=int(batch["n_pairs"]),
                          tokens=batch_tokens(batch), metrics=metrics)


@dataclass
class KTOObjective:
    """KTO on unpaired completions: each desirable (undesirable) completion's implied reward is pushed above
    (below) the batch's KL estimate, from its mismatched rows (another example's completion after this prompt)."""

    beta: float
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    reference: Reference | None = None
    count_key = "n_examples"

    def __call__(self, model: nn.Module, batch: dict[str, Any]) -> LossOutput:
        if self.reference is None:
            raise RuntimeError("KTO needs a reference")
        ref = self.reference(model, batch)
        B = batch["weight"].shape[0]
        ids, targets = batch["input_ids"], batch["targets"]
        with torch.no_grad():  # the KL estimate is a constant of the loss (TRL computes it without gradient too)
            kl_logps, _ = response_logps(unwrap(model), ids[B:], targets[B:])
        logps, _ = response_logps(model, ids[:B], targets[:B])
        kl = kto_kl(kl_logps, ref[B:])
        labels = batch["labels"].to(logps.device)
        losses, rewards = kto_losses(logps, ref[:B], labels, kl, beta=self.beta,
                                     desirable_weight=self.desirable_weight,
                                     undesirable_weight=self.undesirable_weight)
        weight = batch["weight"].to(losses.device)
        good, bad = labels.float() * weight, (~labels).float() * weight
        metrics = {"kl": float(kl) * float(weight.sum()), "desirable": float(good.sum()),
                   "reward_desirable": float((rewards.detach() * good).sum()),
                   "reward_undesirable": float((rewards.detach() * bad).sum())}
        return LossOutput(loss=(losses * weight).sum(), count=int(batch["n_examples"]), tokens=batch_tokens(batch),
                          metrics=metrics)


@dataclass
class RewardObjective:
    """Bradley-Terry on the scalar head's reward of each sequence's last non-pad token, with the pair's margin
    (use_margin) and reward centering (center_coef)."""

    center_coef: float = 0.0
    use_margin: bool = True
    count_key = "n_pairs"

    def __call__(self, model: nn.Module, batch: dict[str, Any]) -> LossOutput:
        from ..model.heads import pooled_scores

        ids = batch["input_ids"]
        if "reward_positions" in batch:  # collate_branched_pairs: one row per pair, the prompt computed once
            from ..model.transformer import BranchedRows

            branches = BranchedRows(prefix=batch["prefix_length"], first=batch["first_length"],
                                    prefix_real=batch["prefix_real"])
            scores = model(ids, position_ids=batch["position_ids"], branches=branches,
                           output_positions=batch["reward_positions"]).float()
            chosen, rejected = scores[:, 0], scores[:, 1]
        else:
            rewards = pooled_scores(model(ids), ids, unwrap(model).cfg.pad_token_id).float()
            B = batch["weight"].shape[0]
            chosen, rejected = rewards[:B], rewards[B:]
        margin = batch["margin"].to(chosen.device) if self.use_margin else None
        losses = bradley_terry_losses(chosen, rejected, margin=margin, center_coef=self.center_coef)
        weight = batch["weight"].to(losses.device)
        metrics = _weighted({"accuracy": (chosen > rejected).float(), "margin": chosen - rejected,
                             "reward_chosen": chosen, "reward_rejected": rejected}, weight)
        return LossOutput(loss=(losses * weight).sum(), count=int(batch["n_pairs"]), tokens=batch_tokens(batch),
                          metrics=metrics)
