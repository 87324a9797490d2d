"""GRPO and RLOO: advantages and losses against the formulas of TRL 1.16's GRPOTrainer / RLOOTrainer (written out
here independently), the loop's unit accounting (the same update however a step is split into micro-batches), and
the rollout source's batches."""

from __future__ import annotations

import pytest
import torch

from forgeline.kernels.cross_entropy import IGNORE_INDEX
from forgeline.objectives.policy_gradient import PolicyGradientObjective, clipped_surrogate, k3_kl, policy_logps
from forgeline.rl.advantages import group_advantages, rloo_advantages


def test_group_advantages_are_trl_grpo_advantages():
    torch.manual_seed(0)
    rewards = torch.rand(12)
    grouped = rewards.view(-1, 4)
    mean = grouped.mean(1).repeat_interleave(4)
    std = grouped.std(1).repeat_interleave(4)  # TRL: nanstd, the sample (n - 1) deviation
    assert torch.allclose(group_advantages(rewards, 4), (rewards - mean) / (std + 1e-4), atol=1e-6)
    assert torch.allclose(group_advantages(rewards, 4, scale="none"), rewards - mean, atol=1e-6)
    assert torch.allclose(group_advantages(rewards, 4, scale="batch"), (rewards - mean) / (rewards.std() + 1e-4),
                          atol=1e-6)
    same = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0])
    assert group_advantages(same, 3)[:3].abs().max() == 0  # an all-equal group teaches nothing


def test_rloo_advantages_use_the_leave_one_out_baseline():
    rewards = torch.tensor([1.0, 0.0, 0.0, 2.0, 3.0, 4.0])
    adv = rloo_advantages(rewards, 3)
    assert torch.allclose(adv, torch.tensor([1 - 0.0, 0 - 0.5, 0 - 0.5, 2 - 3.5, 3 - 3.0, 4 - 2.5]))
    norm = rloo_advantages(rewards, 3, normalize=True)
    assert torch.allclose(norm, (adv - adv.mean()) / (adv.std() + 1e-4))
    with pytest.raises(ValueError, match="at least 2"):
        rloo_advantages(rewards, 1)
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(rewards, 4)


def trl_grpo_loss(logps, old, ref, adv, mask, eps_low, eps_high, beta, loss_type):
    """TRL 1.16 GRPOTrainer._compute_loss for loss_type 'grpo' / 'dapo' (one process, no accumulation)."""
    coef_1 = torch.exp(logps - old)
    coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
    per_token = -torch.min(coef_1 * adv[:, None], coef_2 * adv[:, None])
    if beta:
        per_token = per_token + beta * (torch.exp(ref - logps) - (ref - logps) - 1)
    if loss_type == "grpo":
        return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    return (per_token * mask).sum() / mask.sum().clamp(min=1.0)


def trl_rloo_loss(logps, old, adv, mask, eps):
    coef_1 = torch.exp((logps * mask).sum(1) - (old * mask).sum(1))
    coef_2 = torch.clamp(coef_1, 1 - eps, 1 + eps)
    return (-torch.min(coef_1 * adv, coef_2 * adv)).mean()


class FixedLogps(torch.nn.Module):
    """A stand-in policy whose per-token log-probs are a parameter, so that the loss's gradient can be compared."""

    def __init__(self, logps):
        super().__init__()
        self.logps = torch.nn.Parameter(logps.clone())


@pytest.fixture
def rollouts():
    torch.manual_seed(1)
    B, T = 6, 5
    mask = torch.ones(B, T)
    mask[0, 3:] = 0
    mask[4, 1:] = 0
    logps = -torch.rand(B, T) * 2
    old = logps + torch.randn(B, T) * 0.3  # some ratios outside [0.8, 1.2]: clipping matters
    ref = logps + torch.randn(B, T) * 0.2
    adv = torch.randn(B)
    return logps, old, ref, adv, mask


def run_objective(objective, logps, batch, monkeypatch):
    from forgeline.objectives import policy_gradient

    model = FixedLogps(logps)
    monkeypatch.setattr(policy_gradient, "policy_logps", lambda m, ids, targets: m.logps * (targets != IGNORE_INDEX))
    out = objective(model, batch)
    (out.loss / out.count).backward()
    return out, model.logps.grad


@pytest.mark.parametrize("averaging,loss_type", [("token", "dapo"), ("sequence", "grpo")])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_grpo_loss_and_gradient_equal_trls(rollouts, averaging, loss_type, beta, monkeypatch):
    logps, old, ref, adv, mask = rollouts
    targets = torch.where(mask.bool(), torch.ones_like(mask, dtype=torch.long), IGNORE_INDEX)
    batch = {"input_ids": torch.zeros_like(targets), "targets": targets, "old_logps": old, "ref_logps": ref,
             "advantages": adv, "weight": torch.ones(6),
             "n_units": int(mask.sum()) if averaging == "token" else 6}
    objective = PolicyGradientObjective(epsilon_low=0.2, epsilon_high=0.28, beta=beta, level="token",
                                        averaging=averaging)
    out, grad = run_objective(objective, logps, batch, monkeypatch)
    expected_logps = logps.clone().requires_grad_(True)
    expected = trl_grpo_loss(expected_logps * mask, old * mask, ref * mask, adv, mask, 0.2, 0.28, beta, loss_type)
    expected.backward()
    assert float(out.loss.detach()) / out.count == pytest.approx(float(expected.detach()), abs=1e-6)
    assert torch.allclose(grad, expected_logps.grad, atol=1e-6)
    assert 0 < out.metrics["clip_fraction"] / out.count < 1
    if beta:
        assert out.metrics["kl"] / out.count > 0


def test_rloo_loss_and_gradient_equal_trls(rollouts, monkeypatch):
    logps, old, _, adv, mask = rollouts
    targets = torch.where(mask.bool(), torch.ones_like(mask, dtype=torch.long), IGNORE_INDEX)
    batch = {"input_ids": torch.zeros_like(targets), "targets": targets, "old_logps": old, "advantages": adv,
             "weight": torch.ones(6), "n_units": 6}
    objective = PolicyGradientObjective(epsilon_low=0.2, epsilon_high=0.2, level="sequence", averaging="sequence")
    out, grad = run_objective(objective, logps, batch, monkeypatch)
    expected_logps = logps.clone().requires_grad_(True)
    expected = trl_rloo_loss(expected_logps, old, adv, mask, 0.2)
    expected.backward()
    assert float(out.loss.detach()) / out.count == pytest.approx(float(expected.detach()), abs=1e-6)
    assert torch.allclose(grad * mask, expected_logps.grad * mask, atol=1e-6)


def test_one_pass_without_old_logps_is_the_plain_policy_gradient(rollouts, monkeypatch):
    """Without `old_logps` the ratio is 1 and the gradient is A x grad log pi (averaged as configured)."""
    logps, _, _, adv, mask = rollouts
    targets = torch.where(mask.bool(), torch.ones_like(mask, dtype=torch.long), IGNORE_INDEX)
    batch = {"input_ids": torch.zeros_like(targets), "targets": targets, "advantages": adv, "weight": torch.ones(6),
             "n_units": int(mask.sum())}
    out, grad = run_objective(PolicyGradientObjective(), logps, batch, monkeypatch)
    assert torch.allclose(grad, -adv[:, None] * mask / mask.sum(), atol=1e-7)
    assert out.metrics["clip_fraction"] == 0


def test_surrogate_clips_only_in_the_direction_of_the_advantage():
    logps = torch.log(torch.tensor([[1.5, 0.5, 1.5, 0.5]]))
    old = torch.zeros(1, 4)
    loss, clipped = clipped_surrogate(logps, old, torch.tensor([1.0]), torch.ones(1, 4), epsilon_low=0.2,
                                      epsilon_high=0.2, level="token")
    # ratio 1.5 with A > 0: clipped at 1.2; ratio 0.5 with A > 0: not clipped (the min keeps 0.5)
    assert torch.allclose(loss, torch.tensor([[-1.2, -0.5, -1.2, -0.5]]))
    assert clipped.tolist() == [[True, False, True, False]]
    assert k3_kl(torch.zeros(3), torch.zeros(3)).abs().max() == 0


def test_policy_logps_are_the_models_log_softmax_at_the_targets():
    from forgeline.model import ModelConfig, build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, ffn_dim=64, max_seq_len=32))
    ids = torch.randint(0, 64, (2, 7))
    targets = torch.full((2, 7), IGNORE_INDEX)
    targets[:, 3:6] = ids[:, 4:7]
    got = policy_logps(model, ids, targets)
    full = torch.log_softmax(model(ids).float(), -1)
    want = full[:, 3:6].gather(2, ids[:, 4:7, None])[..., 0]
    assert torch.allclose(got[:, 3:6], want, atol=1e-5) and got[:, :3].abs().max() == 0


def test_the_spike_test_leaves_zero_out_of_its_running_mean():
    """An RL step whose groups all scored alike has a gradient norm of exactly 0; folding those in would pull the
    mean towards 0 until an ordinary step looked like a spike."""
    from forgeline.config import StabilityConfig
    from forgeline.train.stability import SpikeDetector

    detector = SpikeDetector(StabilityConfig(spike_factor=5.0, warmup_steps=2, signal="grad_norm"))
    for value in (1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.2, 0.0, 0.0):
        assert not detector.is_spike(value)
        detector.update(value)
    assert detector.mean == pytest.approx(1.1, abs=0.01) and detector.observed == 2
    assert detector.is_spike(6.0) and not detector.is_spike(0.9)
