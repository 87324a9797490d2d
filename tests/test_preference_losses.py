"""Preference losses (objectives/preference_losses.py) against TRL's own code: values and input gradients.

The reference is always TRL's implementation, called on an instance built without its __init__
(`object.__new__(Trainer)` plus the attributes the loss code reads) and, where TRL computes the loss inside its
`_compute_loss` from a model's per-token log-probs, a stand-in model that hands back per-token log-probs summing to
the test's per-sequence values. TRL's trainers return the batch MEAN there, so the per-example losses come from
one call per example (each example's loss depends only on its own inputs; KTO's KL batch stays the whole batch),
and one whole-batch call checks the mean. Hand-written formulas appear only as extra checks (the IPO paper's form,
the known constants).
"""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from forgeline.errors import ConfigError
from forgeline.objectives.preference_losses import (
    bradley_terry_losses,
    dpo_losses,
    kto_kl,
    kto_losses,
    orpo_losses,
    simpo_losses,
)

# The TRL release these formulas were read from and checked against. On another version the parity tests still run
# (and say which version they ran on); test_trl_version_is_the_checked_one flags that the source must be re-read.
TRL_VERSION = "1.16.0"

# CPO (SimPO) and ORPO live in trl.experimental in 1.16, whose import warns that the API may change; that is what
# TRL_VERSION and the version test are for.
pytestmark = pytest.mark.filterwarnings("ignore:You are importing from 'trl.experimental'")
TOL = dict(atol=1e-5, rtol=0.0)
B = 6
PROMPT = 2  # prompt tokens in front of each stand-in sequence (TRL's completion masks exclude them)


@pytest.fixture(scope="module")
def trl():
    return pytest.importorskip("trl")


def test_trl_version_is_the_checked_one(trl):
    assert trl.__version__ == TRL_VERSION, (
        f"parity was established against TRL {TRL_VERSION}; installed is {trl.__version__}: re-read TRL's loss code"
        " and update TRL_VERSION and the docstrings of forgeline.objectives.preference_losses"
    )


# --------------------------------------------------------------------------------------------------------------------
# data


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """A fixed random batch: summed response log-probs, response lengths, and a mix of preferences both ways."""
    g = torch.Generator().manual_seed(seed)
    chosen_len = torch.randint(3, 12, (B,), generator=g)
    rejected_len = torch.randint(3, 12, (B,), generator=g)
    # Mean token log-probs in (-2.5, -0.1): both sides of ORPO's log1mexp branch at -log 2.
    chosen = -(0.1 + 2.4 * torch.rand(B, generator=g)) * chosen_len
    rejected = -(0.1 + 2.4 * torch.rand(B, generator=g)) * rejected_len
    ref_chosen = chosen + 2.0 * torch.randn(B, generator=g)
    ref_rejected = rejected + 2.0 * torch.randn(B, generator=g)
    return dict(
        chosen=chosen.float(), rejected=rejected.float(), ref_chosen=ref_chosen.float(),
        ref_rejected=ref_rejected.float(), chosen_len=chosen_len, rejected_len=rejected_len,
    )


def _leaves(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.detach().clone().requires_grad_(True) for t in tensors]


def _grads(total: torch.Tensor, leaves: list[torch.Tensor]) -> list[torch.Tensor]:
    grads = torch.autograd.grad(total, leaves, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads)]


def _assert_close(ours, expected, what: str) -> None:
    torch.testing.assert_close(ours, expected, **TOL, msg=lambda m: f"{what}: {m}")


# --------------------------------------------------------------------------------------------------------------------
# stand-ins for what TRL's trainers read


class _Accelerator:
    device = torch.device("cpu")

    @staticmethod
    def gather(x):
        return x

    @staticmethod
    def gather_for_metrics(x):
        return x


class _LogpModel:
    """Returns per-token log-probs whose sum over each row's completion is the given per-sequence value (all of it on
    the first completion position, 0 elsewhere, so sums are exact), keyed by the sequence's token id: TRL's KTO calls
    the model on its main and on its KL sequences."""

    training = True

    def __init__(self, table: dict[int, torch.Tensor]):
        self.table = table

    def __call__(self, input_ids, labels, **_):
        logps = self.table[int(input_ids[0, 0])]
        targets = labels[:, 1:] != -100
        first = targets & (targets.cumsum(dim=1) == 1)
        per_token = first.to(logps.dtype) * logps[:, None]
        shape = per_token.shape
        return SimpleNamespace(log_probs=per_token, entropy=torch.zeros(shape), mean_logits=torch.zeros(shape),
                               is_top1=torch.zeros(shape, dtype=torch.bool))


def _completion_mask(lengths: torch.Tensor) -> torch.Tensor:
    width = PROMPT + int(lengths.max())
    pos = torch.arange(width)[None, :]
    return ((pos >= PROMPT) & (pos < PROMPT + lengths[:, None])).long()


def _bare(cls, **attrs):
    """An instance of a TRL trainer made without its __init__, holding just what its loss code reads."""
    obj = object.__new__(cls)
    defaults = dict(accelerator=_Accelerator(), _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
                    _total_train_tokens=0, _tp_size=1, aux_loss_enabled=False)
    for name, value in {**defaults, **attrs}.items():
        setattr(obj, name, value)
    return obj


# --------------------------------------------------------------------------------------------------------------------
# TRL's losses


def _trl_dpo_mean(pc, pr, rc, rr, lc, lr, *, beta, loss_type, label_smoothing=0.0):
    """TRL 1.16's DPOTrainer._compute_loss on one batch (mean over pairs), plus the trainer for its metrics."""
    from trl.trainer.dpo_trainer import DPOTrainer

    model = _LogpModel({1: torch.cat([pc, pr])})
    trainer = _bare(DPOTrainer, model=model, beta=beta, loss_types=[loss_type], loss_weights=[1.0],
                    label_smoothing=label_smoothing, f_divergence_type="reverse_kl", ld_alpha=None,
                    precompute_ref_logps=True, use_weighting=False)
    mask = _completion_mask(torch.cat([lc, lr]))
    inputs = {"input_ids": torch.ones_like(mask), "attention_mask": torch.ones_like(mask), "completion_mask": mask,
              "ref_chosen_logps": rc, "ref_rejected_logps": rr}
    return trainer._compute_loss(model, inputs, return_outputs=False), trainer


def _trl_dpo(pc, pr, rc, rr, lc, lr, **cfg):
    return torch.stack([_trl_dpo_mean(pc[i:i + 1], pr[i:i + 1], rc[i:i + 1], rr[i:i + 1], lc[i:i + 1], lr[i:i + 1],
                                      **cfg)[0] for i in range(len(pc))])


def _trl_cpo_loss(chosen, rejected, *, beta, loss_type, label_smoothing=0.0, simpo_gamma=None):
    from trl.experimental.cpo import CPOTrainer

    trainer = _bare(CPOTrainer, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
                    simpo_gamma=simpo_gamma, alpha=0.0)
    return trainer.cpo_loss(chosen, rejected)


def _trl_kto_mean(policy, ref, labels, lens, kl_policy, kl_ref, kl_lens, *, beta, dw, uw):
    """TRL 1.16's KTOTrainer._compute_loss (loss_type "kto", precomputed reference log-probs); returns the loss and
    the KL TRL used."""
    from trl.trainer.kto_trainer import KTOTrainer

    model = _LogpModel({1: policy, 2: kl_policy})
    trainer = _bare(KTOTrainer, model=model, beta=beta, loss_type="kto", desirable_weight=dw, undesirable_weight=uw,
                    calculate_KL=True, precompute_ref_logps=True)
    mask, kl_mask = _completion_mask(lens), _completion_mask(kl_lens)
    inputs = {"input_ids": torch.ones_like(mask), "attention_mask": torch.ones_like(mask), "completion_mask": mask,
              "label": labels, "ref_logps": ref, "ref_KL_logps": kl_ref,
              "KL_input_ids": torch.full_like(kl_mask, 2), "KL_attention_mask": torch.ones_like(kl_mask),
              "KL_completion_mask": kl_mask}
    loss = trainer._compute_loss(model, inputs, return_outputs=False)
    return loss, trainer._metrics["train"]["kl"][-1]


def _trl_reward_mean(chosen, rejected, margin, center):
    from trl.trainer.reward_trainer import RewardTrainer

    def model(**_):
        return SimpleNamespace(logits=torch.cat([chosen, rejected])[:, None])

    model.training = True
    trainer = _bare(RewardTrainer, model=model, args=SimpleNamespace(center_rewards_coefficient=center))
    inputs = {"input_ids": torch.ones(2 * len(chosen), 3, dtype=torch.long),
              "attention_mask": torch.ones(2 * len(chosen), 3, dtype=torch.long)}
    if margin is not None:
        inputs["margin"] = margin
    return trainer.compute_loss(model, inputs)


# --------------------------------------------------------------------------------------------------------------------
# parity


@pytest.mark.parametrize("loss_type,beta", [("sigmoid", 0.1), ("ipo", 0.1), ("hinge", 0.5)])
def test_dpo_matches_trl(trl, loss_type, beta):
    d = _batch()
    ours_in = _leaves(d["chosen"], d["rejected"], d["ref_chosen"], d["ref_rejected"])
    losses, chosen_rewards, rejected_rewards = dpo_losses(*ours_in, beta=beta, loss_type=loss_type,
                                                          chosen_len=d["chosen_len"], rejected_len=d["rejected_len"])
    theirs_in = _leaves(d["chosen"], d["rejected"], d["ref_chosen"], d["ref_rejected"])
    theirs = _trl_dpo(*theirs_in, d["chosen_len"], d["rejected_len"], beta=beta, loss_type=loss_type)

    assert losses.shape == (B,)
    _assert_close(losses, theirs, f"DPO {loss_type} losses")
    for ours_g, theirs_g in zip(_grads(losses.sum(), ours_in), _grads(theirs.sum(), theirs_in)):
        _assert_close(ours_g, theirs_g, f"DPO {loss_type} gradients")
    if loss_type == "hinge":  # the batch has pairs on both sides of the hinge
        assert 0 < int((losses > 0).sum()) < B

    # The whole batch in one call: TRL's mean and its reward metrics.
    mean, trainer = _trl_dpo_mean(*[t.detach() for t in theirs_in], d["chosen_len"], d["rejected_len"], beta=beta,
                                  loss_type=loss_type)
    _assert_close(losses.mean(), mean, f"DPO {loss_type} batch mean")
    metrics = trainer._metrics["train"]
    assert chosen_rewards.mean().item() == pytest.approx(metrics["rewards/chosen"][-1], abs=1e-6)
    assert rejected_rewards.mean().item() == pytest.approx(metrics["rewards/rejected"][-1], abs=1e-6)
    assert not chosen_rewards.requires_grad and not rejected_rewards.requires_grad


def test_dpo_label_smoothing_is_trls_conservative_dpo(trl):
    """TRL 1.16's DPOTrainer "sigmoid" ignores label_smoothing; forgeline's is the cDPO form, checked against TRL
    1.16's one implementation of it (CPOTrainer.cpo_loss "sigmoid", on the policy-minus-reference log-ratios)."""
    d, beta, eps = _batch(), 0.1, 0.1
    ours_in = _leaves(d["chosen"], d["rejected"], d["ref_chosen"], d["ref_rejected"])
    losses, _, _ = dpo_losses(*ours_in, beta=beta, label_smoothing=eps)
    pc, pr, rc, rr = theirs_in = _leaves(d["chosen"], d["rejected"], d["ref_chosen"], d["ref_rejected"])
    theirs, _, _ = _trl_cpo_loss(pc - rc, pr - rr, beta=beta, loss_type="sigmoid", label_smoothing=eps)

    _assert_close(losses, theirs, "cDPO losses")
    for ours_g, theirs_g in zip(_grads(losses.sum(), ours_in), _grads(theirs.sum(), theirs_in)):
        _assert_close(ours_g, theirs_g, "cDPO gradients")

    # The documented difference: TRL 1.16's DPOTrainer gives plain DPO whatever label_smoothing says.
    plain, _, _ = dpo_losses(*[t.detach() for t in ours_in], beta=beta)
    dpo_trainer = _trl_dpo(*[t.detach() for t in theirs_in], d["chosen_len"], d["rejected_len"], beta=beta,
                           loss_type="sigmoid", label_smoothing=eps)
    _assert_close(plain, dpo_trainer, "DPOTrainer sigmoid with label_smoothing (ignored)")
    assert not torch.allclose(losses.detach(), plain)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_simpo_matches_trl(trl, label_smoothing):
    d, beta, gamma = _batch(), 2.0, 0.5
    ours_in = _leaves(d["chosen"], d["rejected"])
    losses, chosen_rewards, rejected_rewards = simpo_losses(*ours_in, d["chosen_len"], d["rejected_len"], beta=beta,
                                                            gamma=gamma, label_smoothing=label_smoothing)
    theirs_in = _leaves(d["chosen"], d["rejected"])
    # TRL's CPO/SimPO computes mean log-probs (get_batch_logps with average_log_prob=True) before cpo_loss.
    theirs, their_chosen_rewards, their_rejected_rewards = _trl_cpo_loss(
        theirs_in[0] / d["chosen_len"], theirs_in[1] / d["rejected_len"], beta=beta, loss_type="simpo",
        label_smoothing=label_smoothing, simpo_gamma=gamma)

    _assert_close(losses, theirs, "SimPO losses")
    for ours_g, theirs_g in zip(_grads(losses.sum(), ours_in), _grads(theirs.sum(), theirs_in)):
        _assert_close(ours_g, theirs_g, "SimPO gradients")
    _assert_close(chosen_rewards, their_chosen_rewards, "SimPO chosen rewards")
    _assert_close(rejected_rewards, their_rejected_rewards, "SimPO rejected rewards")


def test_orpo_matches_trl(trl):
    from trl.experimental.orpo import ORPOTrainer

    d, beta = _batch(), 0.1
    mean_c, mean_r = d["chosen"] / d["chosen_len"], d["rejected"] / d["rejected_len"]
    assert bool(((mean_c > -math.log(2)) | (mean_r > -math.log(2))).any())  # both log1mexp branches are exercised
    assert bool(((mean_c < -math.log(2)) | (mean_r < -math.log(2))).any())

    ours_in = _leaves(d["chosen"], d["rejected"])
    losses, log_odds, chosen_rewards, rejected_rewards = orpo_losses(*ours_in, d["chosen_len"], d["rejected_len"],
                                                                     beta=beta)
    theirs_in = _leaves(d["chosen"], d["rejected"])
    trainer = _bare(ORPOTrainer, beta=beta)
    their_losses, their_chosen_rewards, their_rejected_rewards, their_ratio, their_log_odds = trainer.odds_ratio_loss(
        theirs_in[0] / d["chosen_len"], theirs_in[1] / d["rejected_len"])
    theirs = -their_losses  # TRL's total is nll - losses.mean(): its losses are the negated OR loss

    _assert_close(losses, theirs, "ORPO losses")
    for ours_g, theirs_g in zip(_grads(losses.sum(), ours_in), _grads(theirs.sum(), theirs_in)):
        _assert_close(ours_g, theirs_g, "ORPO gradients")
    _assert_close(log_odds.mean(), their_log_odds.detach(), "ORPO mean log odds")
    _assert_close(-losses.detach().mean() / beta, their_ratio.detach(), "ORPO mean logsigmoid(log odds)")
    _assert_close(chosen_rewards, their_chosen_rewards, "ORPO chosen rewards")
    _assert_close(rejected_rewards, their_rejected_rewards, "ORPO rejected rewards")


@pytest.mark.parametrize("kl_shift", [1.5, -1.5], ids=["kl-positive", "kl-clamped"])
def test_kto_matches_trl(trl, kl_shift):
    d, beta, dw, uw = _batch(), 0.5, 1.0, 1.33
    g = torch.Generator().manual_seed(1)
    labels = torch.tensor([True, False, True, True, False, False])
    policy, ref, lens = d["chosen"], d["ref_chosen"], d["chosen_len"]
    # The KL batch: mismatched pairs (TRL cycles responses by one); its mean log-ratio is about kl_shift.
    kl_policy = torch.roll(d["rejected"], 1)
    kl_ref = kl_policy - kl_shift + 0.3 * torch.randn(B, generator=g)
    kl_lens = torch.roll(d["rejected_len"], 1)

    kl = kto_kl(kl_policy, kl_ref)
    ours_in = _leaves(policy, ref)
    losses, rewards = kto_losses(*ours_in, labels, kl, beta=beta, desirable_weight=dw, undesirable_weight=uw)

    theirs_in = _leaves(policy, ref)
    per_example = []
    for i in range(B):  # one example against the whole KL batch
        loss, their_kl = _trl_kto_mean(theirs_in[0][i:i + 1], theirs_in[1][i:i + 1], labels[i:i + 1],
                                       lens[i:i + 1], kl_policy, kl_ref, kl_lens, beta=beta, dw=dw, uw=uw)
        assert kl.item() == pytest.approx(their_kl, abs=1e-6)
        per_example.append(loss)
    theirs = torch.stack(per_example)

    if kl_shift < 0:
        assert kl.item() == 0.0 and (kl_policy - kl_ref).mean() < 0
    else:
        assert kl.item() > 1.0
    _assert_close(losses, theirs, "KTO losses")
    for ours_g, theirs_g in zip(_grads(losses.sum(), ours_in), _grads(theirs.sum(), theirs_in)):
        _assert_close(ours_g, theirs_g, "KTO gradients")
    _assert_close(rewards, beta * (policy - ref), "KTO rewards")

    mean, _ = _trl_kto_mean(policy, ref, labels, lens, kl_policy, kl_ref, kl_lens, beta=beta, dw=dw, uw=uw)
    _assert_close(losses.detach().mean(), mean, "KTO batch mean")


def test_kto_kl_carries_no_gradient():
    policy = torch.tensor([-3.0, -5.0, -2.0], requires_grad=True)
    kl = kto_kl(policy, torch.tensor([-4.0, -5.0, -4.0]))
    assert not kl.requires_grad and kl.item() == pytest.approx(1.0)
    kl_with_grad = torch.tensor(0.5, requires_grad=True)
    losses, _ = kto_losses(policy, torch.zeros(3), torch.tensor([True, False, True]), kl_with_grad, beta=0.1)
    losses.sum().backward()  # a kl that requires grad is detached inside: only the policy gets a gradient
    assert policy.grad is not None and kl_with_grad.grad is None


@pytest.mark.parametrize("with_margin", [False, True], ids=["no-margin", "margin"])
@pytest.mark.parametrize("center", [None, 0.01], ids=["no-center", "center"])
def test_bradley_terry_matches_trl(trl, with_margin, center):
    g = torch.Generator().manual_seed(2)
    chosen, rejected = 2.0 * torch.randn(B, generator=g), 2.0 * torch.randn(B, generator=g)
    margin = torch.rand(B, generator=g) if with_margin else None

    ours_in = _leaves(chosen, rejected)
    losses = bradley_terry_losses(*ours_in, margin=margin, center_coef=center or 0.0)
    theirs_in = _leaves(chosen, rejected)
    theirs = torch.stack([_trl_reward_mean(theirs_in[0][i:i + 1], theirs_in[1][i:i + 1],
                                           None if margin is None else margin[i:i + 1], center) for i in range(B)])

    assert losses.shape == (B,)
    _assert_close(losses, theirs, "reward-model losses")
    for ours_g, theirs_g in zip(_grads(losses.sum(), ours_in), _grads(theirs.sum(), theirs_in)):
        _assert_close(ours_g, theirs_g, "reward-model gradients")
    _assert_close(losses.detach().mean(), _trl_reward_mean(chosen, rejected, margin, center), "reward batch mean")


# --------------------------------------------------------------------------------------------------------------------
# hand-written checks


def test_ipo_paper_form_is_unit_lengths():
    """IPO's Eq. 17 on summed log-probs, (d - 1/(2 tau))**2, is the length-normalised loss with unit lengths."""
    d, beta = _batch(), 0.1
    ones = torch.ones(B, dtype=torch.long)
    losses, _, _ = dpo_losses(d["chosen"], d["rejected"], d["ref_chosen"], d["ref_rejected"], beta=beta,
                              loss_type="ipo", chosen_len=ones, rejected_len=ones)
    delta = (d["chosen"] - d["ref_chosen"]) - (d["rejected"] - d["ref_rejected"])
    _assert_close(losses, (delta - 1 / (2 * beta)) ** 2, "IPO paper form")
    normalised, _, _ = dpo_losses(d["chosen"], d["rejected"], d["ref_chosen"], d["ref_rejected"], beta=beta,
                                  loss_type="ipo", chosen_len=d["chosen_len"], rejected_len=d["rejected_len"])
    mean_delta = ((d["chosen"] - d["ref_chosen"]) / d["chosen_len"]
                  - (d["rejected"] - d["ref_rejected"]) / d["rejected_len"])
    _assert_close(normalised, (mean_delta - 1 / (2 * beta)) ** 2, "IPO length-normalised form")


def _every_loss(chosen, rejected, ref_chosen, ref_rejected, chosen_len, rejected_len):
    """Every pairwise loss on the same inputs, by name."""
    out = {}
    for loss_type, beta, eps in [("sigmoid", 0.1, 0.0), ("sigmoid", 0.1, 0.1), ("ipo", 0.1, 0.0),
                                 ("hinge", 0.1, 0.0)]:
        out[f"dpo-{loss_type}-{eps}"] = dpo_losses(chosen, rejected, ref_chosen, ref_rejected, beta=beta,
                                                   loss_type=loss_type, label_smoothing=eps, chosen_len=chosen_len,
                                                   rejected_len=rejected_len)[0]
    out["simpo"] = simpo_losses(chosen, rejected, chosen_len, rejected_len, beta=2.0, gamma=0.5)[0]
    out["orpo"] = orpo_losses(chosen, rejected, chosen_len, rejected_len, beta=0.1)[0]
    out["bradley-terry"] = bradley_terry_losses(chosen, rejected)
    out["bradley-terry-margin"] = bradley_terry_losses(chosen, rejected, margin=torch.full_like(chosen, 0.5))
    return out


def test_gradients_point_the_right_way():
    """Raising the chosen log-prob (or reward) lowers every loss; raising the rejected one raises it. KTO: raising a
    desirable example's log-prob lowers its loss, raising an undesirable one's raises it."""
    d = _batch()
    # Small margins keep the hinge active on every pair, so its gradient is nonzero everywhere.
    gap = 0.5 * torch.rand(B, generator=torch.Generator().manual_seed(3))
    chosen, rejected = _leaves(d["chosen"], d["chosen"] - gap)
    ref = d["chosen"].clone()
    for name, losses in _every_loss(chosen, rejected, ref, ref, d["chosen_len"], d["chosen_len"]).items():
        g_chosen, g_rejected = torch.autograd.grad(losses.sum(), [chosen, rejected])
        assert bool((g_chosen < 0).all()), f"{name}: d loss / d chosen = {g_chosen}"
        assert bool((g_rejected > 0).all()), f"{name}: d loss / d rejected = {g_rejected}"

    policy = d["chosen"].clone().requires_grad_(True)
    labels = torch.tensor([True, False] * (B // 2))
    losses, _ = kto_losses(policy, d["ref_chosen"], labels, torch.tensor(0.3), beta=0.5)
    (g,) = torch.autograd.grad(losses.sum(), [policy])
    assert bool((g[labels] < 0).all()) and bool((g[~labels] > 0).all()), f"KTO: {g}"


def test_degenerate_inputs_give_known_constants():
    """Identical chosen and rejected responses (zero margin): each loss is a known constant."""
    logps = torch.tensor([-7.0, -3.0, -12.5])
    lens = torch.tensor([5, 2, 9])
    ref = torch.tensor([-6.0, -4.0, -11.0])
    beta, gamma = 0.1, 0.5

    def full(value):
        return torch.full((3,), value)

    for eps in (0.0, 0.1):  # at zero margin both cDPO terms are log 2
        losses, rc, rr = dpo_losses(logps, logps, ref, ref, beta=beta, label_smoothing=eps)
        _assert_close(losses, full(math.log(2)), f"sigmoid DPO (eps={eps}) at zero margin")
        _assert_close(rc, rr, "equal rewards")
    _assert_close(dpo_losses(logps, logps, ref, ref, beta=beta, loss_type="ipo", chosen_len=lens,
                             rejected_len=lens)[0], full(1 / (4 * beta**2)), "IPO at zero margin")
    _assert_close(dpo_losses(logps, logps, ref, ref, beta=beta, loss_type="hinge")[0], full(1.0),
                  "hinge at zero margin")
    _assert_close(simpo_losses(logps, logps, lens, lens, beta=2.0, gamma=gamma)[0],
                  full(math.log1p(math.exp(gamma))), "SimPO at zero margin: softplus(gamma)")
    _assert_close(orpo_losses(logps, logps, lens, lens, beta=beta)[0], full(beta * math.log(2)),
                  "ORPO at zero log odds")
    _assert_close(bradley_terry_losses(ref, ref), full(math.log(2)), "Bradley-Terry at equal rewards")
    _assert_close(bradley_terry_losses(ref, ref, center_coef=0.01), math.log(2) + 0.01 * (2 * ref) ** 2,
                  "Bradley-Terry at equal rewards, centred")
    kto, _ = kto_losses(ref + 0.7, ref, torch.tensor([True, False, True]), torch.tensor(0.7), beta=beta,
                        desirable_weight=1.0, undesirable_weight=2.0)
    _assert_close(kto, torch.tensor([0.5, 1.0, 0.5]), "KTO at log-ratio == KL: half of each weight")


def test_bad_arguments_are_config_errors():
    x = torch.zeros(2)
    with pytest.raises(ConfigError, match="loss_type"):
        dpo_losses(x, x, x, x, beta=0.1, loss_type="robust")
    with pytest.raises(ConfigError, match="chosen_len"):
        dpo_losses(x, x, x, x, beta=0.1, loss_type="ipo")
    with pytest.raises(ConfigError, match="sigmoid"):
        dpo_losses(x, x, x, x, beta=0.1, loss_type="hinge", label_smoothing=0.1)
    with pytest.raises(ConfigError, match=r"\[0, 0.5\)"):
        dpo_losses(x, x, x, x, beta=0.1, label_smoothing=0.5)
    with pytest.raises(ConfigError, match=r"\[0, 0.5\)"):
        simpo_losses(x, x, x, x, beta=2.0, gamma=0.5, label_smoothing=-0.1)
