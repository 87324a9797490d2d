"""Policy-gradient objectives for online RL on rollouts: GRPO's clipped per-token surrogate with a per-token KL
penalty, and RLOO's clipped per-sequence one (its KL penalty is in the reward, before the advantages).

A rollout batch (rl/rollout.py) holds rows [prompt | completion] with `targets` (the completion's tokens at the
positions that predict them, IGNORE_INDEX elsewhere), one `advantages` value per row, and optionally the
per-token log-probs of the policy that generated them (`old_logps`; without them the policy is the current one:
a single optimisation pass, ratio 1, the same gradient) and of the reference (`ref_logps`).

    ratio      r_t = exp(log pi(y_t) - log pi_old(y_t))          (level "token")
               r   = exp(sum_t log pi(y_t) - sum_t log pi_old(y_t))  (level "sequence": RLOO)
    surrogate  -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)
    KL         exp(ref - logp) - (ref - logp) - 1 per token (Schulman's k3, >= 0), times beta, in the loss
    averaging  "token": the sum over every completion token of the optimizer step / their number (DAPO's, TRL's
               default `dapo`); "sequence": each completion's mean over its tokens, then the mean over completions
               (the GRPO paper's, TRL's `grpo`). RLOO's per-sequence loss is a mean over completions.

The loop divides by the step's units (executor contract), so the units are completion tokens or completions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..kernels.cross_entropy import IGNORE_INDEX
from ..kernels.logprobs import token_logprobs
from ..model.masks import prefix_tree_mask
from ..train.distributed import unwrap
from ..train.executor import LossOutput, batch_tokens


def policy_logps(model: nn.Module, input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B, T) log p(target) at every position (0 where the target is IGNORE_INDEX)."""
    hidden = model(input_ids, return_hidden=True)
    return token_logprobs(hidden, unwrap(model).lm_head_weight(), targets)


def rollout_logps(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """(N, Tc) per-token log-probs of each completion of a rollout batch (0 where `targets` is IGNORE_INDEX).

    A batch in prefix-tree form (rl/rollout.py) holds rows [prompt | completion 1 | completion 2 | ...] whose
    completions attend to their prompt and themselves only (`branch`, `position_ids`): the prompt is run once for
    its whole group. `gather` (N, Tc) says which row position predicts each completion token. Plain rows (one
    completion each, `targets` aligned with `input_ids`) are run as they are."""
    if "gather" not in batch:
        return policy_logps(model, batch["input_ids"], batch["targets"])
    hidden = model(batch["input_ids"], position_ids=batch["position_ids"],
                   attention_mask=prefix_tree_mask(batch["branch"]), return_hidden=True)
    picked = hidden.reshape(-1, hidden.shape[-1])[batch["gather"].clamp(min=0).to(hidden.device)]
    return token_logprobs(picked, unwrap(model).lm_head_weight(), batch["targets"].to(hidden.device))


def clipped_surrogate(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                      *, epsilon_low: float, epsilon_high: float, level: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-token ("token") or per-row ("sequence") surrogate loss and whether each term is clipped.
    logps, old_logps, mask: (B, T); advantages: (B,)."""
    if level == "token":
        ratio = torch.exp(logps - old_logps)
        adv = advantages[:, None]
    elif level == "sequence":
        ratio = torch.exp(((logps - old_logps) * mask).sum(-1))
        adv = advantages
    else:
        raise ValueError(f"level must be 'token' or 'sequence', got {level!r}")
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    loss = -torch.min(ratio * adv, clipped * adv)
    was_clipped = ((ratio < 1 - epsilon_low) & (adv < 0)) | ((ratio > 1 + epsilon_high) & (adv > 0))
    return loss, was_clipped


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) from samples of pi: exp(ref - logp) - (ref - logp) - 1 (unbiased, >= 0)."""
    delta = ref_logps - logps
    return torch.exp(delta) - delta - 1


@dataclass
class PolicyGradientObjective:
    """GRPO (level "token", KL in the loss with beta) or RLOO (level "sequence", beta 0 here: its KL penalty is in
    the reward). averaging: "token" or "sequence" (GRPO; RLOO is "sequence")."""

    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    beta: float = 0.0
    level: str = "token"
    averaging: str = "token"
    count_key = "n_units"

    def __post_init__(self):
        if self.averaging not in ("token", "sequence"):
            raise ValueError(f"averaging must be 'token' or 'sequence', got {self.averaging!r}")
        if self.level == "sequence" and self.averaging != "sequence":
            raise ValueError("a per-sequence ratio (RLOO) takes sequence averaging")

    def __call__(self, model: nn.Module, batch: dict[str, Any]) -> LossOutput:
        targets = batch["targets"]
        mask = (targets != IGNORE_INDEX).float()
        logps = rollout_logps(model, batch)
        old = batch.get("old_logps")
        old = logps.detach() if old is None else old.float()
        advantages = batch["advantages"].float()
        weight = batch["weight"].float()  # 0 for rows that only fill a micro-batch
        surrogate, clipped = clipped_surrogate(logps, old, advantages, mask, epsilon_low=self.epsilon_low,
                                               epsilon_high=self.epsilon_high, level=self.level)
        lengths = mask.sum(-1).clamp(min=1.0)
        metrics: dict[str, float] = {}
        if self.level == "token":
            per_token = surrogate
            if self.beta:
                kl = k3_kl(logps, batch["ref_logps"].float())
                per_token = per_token + self.beta * kl
            if self.averaging == "token":
                loss = (per_token * mask * weight[:, None]).sum()
            else:
                loss = ((per_token * mask).sum(-1) / lengths * weight).sum()
        else:
            loss = (surrogate * weight).sum()
        # Metrics are sums over the step's units, as the loss is: per token, or per completion (each completion's
        # tokens then weigh 1 / its length).
        unit = mask * weight[:, None] if self.averaging == "token" else weight[:, None] * mask / lengths[:, None]
        with torch.no_grad():
            metrics["clip_fraction"] = float((clipped.float() * unit).sum()) if self.level == "token" else \
                float((clipped.float() * weight).sum())
            # approx-KL between the generating and the current policy (Schulman's k3 again, from pi_old's samples)
            metrics["approx_kl"] = float((k3_kl(old, logps.detach()) * unit).sum())
            metrics["logp"] = float((logps.detach() * unit).sum())
            if self.level == "token" and self.beta:
                metrics["kl"] = float((k3_kl(logps.detach(), batch["ref_logps"].float()) * unit).sum())
        return LossOutput(loss=loss, count=int(batch["n_units"]), tokens=batch_tokens(batch), metrics=metrics)
