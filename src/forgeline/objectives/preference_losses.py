"""Preference losses as pure tensor functions of per-sequence log-probabilities (or rewards): no model inside.

Each function returns per-example losses, shape (B,), not reduced, so the model-level objective decides how to sum and
normalise them (forgeline's loop divides by the step's global unit count, here the number of pairs / examples), plus
the detached quantities its metrics need. The formulas match TRL 1.16.0 (`tests/test_preference_losses.py` checks
values and gradients against TRL's own code); each docstring gives the formula, TRL's counterpart and any difference.

Conventions for every function:

- `*_logps` are SUMMED log-probs of the response tokens, shape (B,); `*_len` the number of response tokens, shape
  (B,), used where a loss is length-normalised (IPO, SimPO, ORPO). Lengths are clamped at 1, as TRL's IPO does, so an
  empty response gives a finite loss rather than a division by zero.
- Inputs are upcast to fp32 (TRL's ORPO does the same), so bf16 log-probs do not lose the small differences the
  losses are made of; the B-sized arithmetic costs nothing.
- Rewards returned for metrics are detached.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import ConfigError

__all__ = [
    "DPO_LOSS_TYPES",
    "bradley_terry_losses",
    "dpo_losses",
    "kto_kl",
    "kto_losses",
    "orpo_losses",
    "simpo_losses",
]

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge")

# log(1 - exp(x)) switches formula at x = -log 2 (Maechler's rule, as TRL's ORPO `log1mexp` does): log1p(-exp(x))
# loses nothing for very negative x, log(-expm1(x)) loses nothing near 0 where 1 - exp(x) cancels.
_LOG1MEXP_BRANCH = -math.log(2.0)


def _f32(x: torch.Tensor) -> torch.Tensor:
    return x.float()


def _lengths(n: torch.Tensor | None, like: torch.Tensor, name: str, what: str) -> torch.Tensor:
    if n is None:
        raise ConfigError(f"{what} is length-normalised: pass {name} (the number of response tokens per example)")
    n = torch.as_tensor(n, device=like.device)
    return n.to(torch.float32).clamp(min=1.0)


def _check_label_smoothing(label_smoothing: float) -> None:
    # At 0.5 the two terms weigh equally and the loss no longer depends on which response is preferred.
    if not 0.0 <= label_smoothing < 0.5:
        raise ConfigError(f"label_smoothing must lie in [0, 0.5), got {label_smoothing}")


def _smoothed_sigmoid_loss(logits: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """-(1 - eps) * logsigmoid(z) - eps * logsigmoid(-z): cDPO, the loss when a label is flipped with prob. eps."""
    losses = -F.logsigmoid(logits)
    if label_smoothing:
        losses = losses * (1.0 - label_smoothing) - F.logsigmoid(-logits) * label_smoothing
    return losses


def dpo_losses(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_len: torch.Tensor | None = None,
    rejected_len: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO and two of its variants on per-sequence log-probs; returns (losses, chosen_rewards, rejected_rewards).

    With the log-ratios  c = policy_chosen - ref_chosen,  r = policy_rejected - ref_rejected  and  d = c - r:

    - "sigmoid" (DPO):  -(1 - eps) * logsigmoid(beta * d) - eps * logsigmoid(-beta * d),  eps = label_smoothing
      (conservative DPO; eps = 0 is plain DPO).
    - "ipo":  (c / chosen_len - r / rejected_len - 1 / (2 * beta))**2,  lengths clamped at 1. Like TRL, the
      log-ratios are LENGTH-NORMALISED (mean over response tokens), which makes beta (the paper's tau) comparable
      across response lengths; TRL says its authors confirmed the paper's results use this form. The paper's Eq. 17
      on summed log-probs, (d - 1 / (2 * beta))**2, is this function with chosen_len = rejected_len = 1.
    - "hinge" (SLiC):  relu(1 - beta * d).

    chosen_rewards = beta * c and rejected_rewards = beta * r (detached, never length-normalised, as in TRL).

    TRL 1.16: `trl.trainer.dpo_trainer.DPOTrainer._compute_loss`, loss types "sigmoid", "ipo", "hinge" with the
    default f_divergence_type "reverse_kl"; IPO's lengths there are the completion-mask sums. One difference:
    TRL 1.16's "sigmoid" ignores `label_smoothing` (its config documents it only for "robust" and "exo_pair"); the
    cDPO form here is TRL's earlier `DPOTrainer.dpo_loss` and TRL 1.16's `CPOTrainer.cpo_loss` "sigmoid" applied to
    the log-ratios, and is identical to TRL 1.16 at label_smoothing = 0. label_smoothing with "ipo" or "hinge" is
    an error here (TRL ignores it), since it would silently do nothing.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ConfigError(f"unknown DPO loss_type {loss_type!r}; expected one of {', '.join(DPO_LOSS_TYPES)}")
    _check_label_smoothing(label_smoothing)
    if label_smoothing and loss_type != "sigmoid":
        raise ConfigError(f"label_smoothing applies to loss_type 'sigmoid' only, not {loss_type!r}")
    chosen_logratios = _f32(policy_chosen_logps) - _f32(ref_chosen_logps)
    rejected_logratios = _f32(policy_rejected_logps) - _f32(ref_rejected_logps)

    if loss_type == "sigmoid":
        losses = _smoothed_sigmoid_loss(beta * (chosen_logratios - rejected_logratios), label_smoothing)
    elif loss_type == "hinge":
        losses = torch.relu(1.0 - beta * (chosen_logratios - rejected_logratios))
    else:  # ipo
        chosen_n = _lengths(chosen_len, chosen_logratios, "chosen_len", "IPO")
        rejected_n = _lengths(rejected_len, rejected_logratios, "rejected_len", "IPO")
        delta = chosen_logratios / chosen_n - rejected_logratios / rejected_n
        losses = (delta - 1.0 / (2.0 * beta)) ** 2

    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def simpo_losses(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    chosen_len: torch.Tensor,
    rejected_len: torch.Tensor,
    *,
    beta: float,
    gamma: float,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SimPO (reference-free, length-normalised); returns (losses, chosen_rewards, rejected_rewards).

    With the mean log-probs  c = policy_chosen / chosen_len,  r = policy_rejected / rejected_len  and the margin
    z = beta * (c - r - gamma / beta) = beta * (c - r) - gamma:

        losses = -(1 - eps) * logsigmoid(z) - eps * logsigmoid(-z),   eps = label_smoothing

    chosen_rewards = beta * c, rejected_rewards = beta * r (detached).

    gamma is the paper's target reward margin (TRL's `simpo_gamma`). TRL writes the logits as
    (c - r) - gamma / beta and then multiplies by beta, so gamma is a margin on the beta-scaled rewards, not on the
    log-probs; the same here. TRL 1.16: `trl.experimental.cpo.CPOTrainer.cpo_loss` with loss_type "simpo" and
    alpha 0 (SimPO is CPO with `cpo_alpha=0`, i.e. no NLL term), fed the mean log-probs its `get_batch_logps`
    computes with `average_log_prob=True`. Difference: lengths are clamped at 1 here (TRL divides by 0 -> nan).
    """
    _check_label_smoothing(label_smoothing)
    chosen = _f32(policy_chosen_logps) / _lengths(chosen_len, policy_chosen_logps, "chosen_len", "SimPO")
    rejected = _f32(policy_rejected_logps) / _lengths(rejected_len, policy_rejected_logps, "rejected_len", "SimPO")
    logits = (chosen - rejected) - gamma / beta
    losses = _smoothed_sigmoid_loss(beta * logits, label_smoothing)
    return losses, beta * chosen.detach(), beta * rejected.detach()


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, without cancellation at either end."""
    # Both branches are evaluated by torch.where; clamping the inputs each branch does not use keeps a nan or inf
    # from the unused one out of the gradient.
    small = x < _LOG1MEXP_BRANCH
    far = torch.log1p(-torch.exp(torch.where(small, x, torch.full_like(x, _LOG1MEXP_BRANCH))))
    near = torch.log(-torch.expm1(torch.where(small, torch.full_like(x, _LOG1MEXP_BRANCH), x)))
    return torch.where(small, far, near)


def orpo_losses(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    chosen_len: torch.Tensor,
    rejected_len: torch.Tensor,
    *,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """ORPO's odds-ratio term; returns (or_losses, log_odds_ratio, chosen_rewards, rejected_rewards).

    With the mean log-probs  c = policy_chosen / chosen_len,  r = policy_rejected / rejected_len  and
    log odds(p) = log p - log(1 - p) computed from log p as  lp - log1p(-exp(lp)):

        log_odds_ratio = (c - r) - (log(1 - exp(c)) - log(1 - exp(r)))
        or_losses      = -beta * logsigmoid(log_odds_ratio)

    The NLL of the chosen response (ORPO's SFT term) is NOT included: the caller adds it, with its own token
    normalisation. log_odds_ratio (detached) is for metrics; chosen_rewards = beta * c, rejected_rewards = beta * r
    (detached).

    TRL 1.16: `trl.experimental.orpo.ORPOTrainer.odds_ratio_loss` (with its module's `log1mexp`), fed the mean
    log-probs (`average_log_prob=True`). TRL returns beta * logsigmoid(log_odds) and its total is
    `nll - losses.mean()`; the sign is folded in here so that or_losses is a loss to minimise (TRL's returned
    `losses` = -or_losses). Difference: lengths clamped at 1.
    """
    chosen = _f32(policy_chosen_logps) / _lengths(chosen_len, policy_chosen_logps, "chosen_len", "ORPO")
    rejected = _f32(policy_rejected_logps) / _lengths(rejected_len, policy_rejected_logps, "rejected_len", "ORPO")
    log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))
    losses = -beta * F.logsigmoid(log_odds)
    return losses, log_odds.detach(), beta * chosen.detach(), beta * rejected.detach()


def kto_kl(policy_kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    """KTO's reference point: the batch estimate of KL(policy || ref), a detached scalar.

        kl = clamp(mean(policy_kl_logps - ref_kl_logps), min=0)

    The inputs are summed log-probs of MISMATCHED (prompt, response) pairs: TRL pairs each prompt with the batch's
    previous example's response (responses cycled by one within the batch), under the policy and the reference.
    The estimate carries no gradient (TRL computes the policy's KL log-probs under no_grad and detaches).

    TRL 1.16: `trl.trainer.kto_trainer.KTOTrainer._compute_loss`: each process takes the mean over its own batch,
    then `accelerator.gather_for_metrics(kl).mean()` averages those per-process means over all processes (equal
    weight per process), and only then clamps at 0; gradient-accumulation micro-batches are not averaged together.
    forgeline's choice: this function is the local estimate over the tensors it is given (one micro-batch on one
    rank) with no collective inside, so the objective stays a function of its batch (no hidden all-reduce that
    would deadlock ranks running different numbers of micro-batches, or pipeline stages), and its value does not
    change with the number of processes. On one process it equals TRL exactly; on N processes TRL's estimate pools
    N batches, so it is less noisy than the local one but otherwise the same quantity (a detached shift of each
    example's log-ratio). To reproduce TRL across processes, all-reduce (mean) the unclamped local mean and clamp
    afterwards.
    """
    return (_f32(policy_kl_logps) - _f32(ref_kl_logps)).mean().detach().clamp(min=0)


def kto_losses(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    labels: torch.Tensor,
    kl: torch.Tensor,
    *,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """KTO on unpaired examples; returns (losses, rewards), both in the input order.

    With the log-ratio  x = policy_logps - ref_logps  and the reference point kl (`kto_kl`, detached here too):

        desirable   (labels True):   desirable_weight   * (1 - sigmoid(beta * (x - kl)))
        undesirable (labels False):  undesirable_weight * (1 - sigmoid(beta * (kl - x)))

    rewards = beta * x (detached). kl enters only as that shift, never with a gradient: a larger KL estimate moves
    the point where a desirable example stops being rewarded.

    TRL 1.16: `trl.trainer.kto_trainer.KTOTrainer._compute_loss`, loss_type "kto". TRL concatenates the desirable
    losses then the undesirable ones and returns `losses.nanmean()` (a plain mean over all examples, weights
    included); here each loss stays at its example's position, so `losses.mean()` equals TRL's loss.
    """
    labels = torch.as_tensor(labels, device=policy_logps.device).bool()
    logratios = _f32(policy_logps) - _f32(ref_logps)
    kl = torch.as_tensor(kl, dtype=torch.float32, device=logratios.device).detach()
    desirable = desirable_weight * (1.0 - torch.sigmoid(beta * (logratios - kl)))
    undesirable = undesirable_weight * (1.0 - torch.sigmoid(beta * (kl - logratios)))
    return torch.where(labels, desirable, undesirable), beta * logratios.detach()


def bradley_terry_losses(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    *,
    margin: torch.Tensor | None = None,
    center_coef: float = 0.0,
) -> torch.Tensor:
    """The reward model's pairwise (Bradley-Terry) loss per pair:

        -logsigmoid(r_c - r_r - margin) + center_coef * (r_c + r_r)**2

    margin (per pair, optional) asks for a larger gap on pairs rated further apart (Llama 2's margin loss).
    The centering term (Eisenstein et al. 2023, Eq. 2) pulls the summed pair reward towards 0 so rewards stay
    mean-zero; it is squared per pair, not the squared batch mean.

    TRL 1.16: `trl.trainer.reward_trainer.RewardTrainer.compute_loss`: `-logsigmoid(r_c - r_r - margin).mean()`
    plus `center_rewards_coefficient * mean((r_c + r_r)**2)`; the mean of these per-pair losses is TRL's loss
    exactly (TRL's None coefficient is 0 here).
    """
    chosen = _f32(chosen_rewards)
    rejected = _f32(rejected_rewards)
    diff = chosen - rejected
    if margin is not None:
        diff = diff - torch.as_tensor(margin, dtype=torch.float32, device=diff.device)
    losses = -F.logsigmoid(diff)
    if center_coef:
        losses = losses + center_coef * (chosen + rejected) ** 2
    return losses
